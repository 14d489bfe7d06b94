"""tusd-py: a tus resumable-upload server for S3 and local disk."""

__version__ = "0.1.0"
