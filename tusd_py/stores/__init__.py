"""Upload stores behind the interfaces of base.py."""
