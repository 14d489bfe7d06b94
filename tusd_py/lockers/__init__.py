"""Per-upload lockers behind the interface of base.py."""
