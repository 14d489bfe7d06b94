"""HTTP/1.1 over asyncio and h11. Knows nothing of tus."""
