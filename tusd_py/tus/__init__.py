"""The tus protocol handler. Never imports h11 or touches a transport."""
