"""Checks of the S3 store's key settings (kept apart from ``config`` to keep it small)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from tusd_py.stores.s3_keys import ObjectKeyTemplate

if TYPE_CHECKING:
    from tusd_py.config import S3StoreConfig


def s3_keys_problem(s3: S3StoreConfig) -> str | None:
    """A one-line message when ``store.s3.object_key`` or ``metadata_prefix`` is
    unusable, else None."""
    try:
        ObjectKeyTemplate(s3.object_key)
    except ValueError as error:
        return f"store.s3.object_key {s3.object_key!r}: {error}"
    for name in ("prefix", "metadata_prefix"):
        if getattr(s3, name).startswith("/"):
            return f"store.s3.{name} must not start with '/' (S3 keys have no leading slash)"
    return None
