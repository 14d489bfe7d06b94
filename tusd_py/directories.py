"""The directories a configuration writes in, checked before the server starts.

A directory the service user cannot write would otherwise show up at the first request
that needs it (a 500), after systemd was told the server is ready.
"""

from __future__ import annotations

import hashlib
import os
import pwd
import tempfile

from tusd_py.config import Config, ConfigError


def lock_directory(config: Config) -> str:
    """``lock.file.directory``, or a default every worker of this host derives alike:
    ``<store.file.directory>/.locks`` for the file store; for S3, a directory in the
    system temp dir named by a hash of endpoint, bucket and prefix, so every tusd-py
    process of this host that serves the same uploads shares it (whatever its port)."""
    if config.lock.file.directory:
        return config.lock.file.directory
    if config.store.backend == "file":
        return os.path.join(config.store.file.directory, ".locks")
    s3 = config.store.s3
    name = hashlib.sha256(f"{s3.endpoint_url}|{s3.bucket}|{s3.prefix}".encode()).hexdigest()[:16]
    return os.path.join(tempfile.gettempdir(), f"tusd-py-locks-{name}")


def writable_directories(config: Config) -> list[tuple[str, str, str]]:
    """The directories this configuration writes files in, as (what it is, the key
    that sets it, path): the file store's data, the S3 spool, the file locker's
    directory and the checksum spool (the last two default to the temp directory)."""
    directories = []
    if config.store.backend == "file":
        directories.append(("data", "store.file.directory", config.store.file.directory))
    elif config.store.s3.spool == "file":
        directories.append(("spool", "store.s3.spool_dir", config.store.s3.spool_dir or tempfile.gettempdir()))
    if config.lock.backend == "file":
        directories.append(("lock", "lock.file.directory", lock_directory(config)))
    directories.append(("checksum", "checksum.spool_dir", config.checksum.spool_dir or tempfile.gettempdir()))
    return directories


def _user() -> str:
    uid = os.geteuid()
    try:
        return f"{pwd.getpwuid(uid).pw_name} (uid {uid})"
    except KeyError:
        return f"uid {uid}"


def check_directories(config: Config) -> None:
    """Create the directories the server writes in (as the store and locker would)
    and create and remove a file in each, so that a directory this user cannot write
    stops the start-up instead of failing the first request after systemd was told
    the server is ready. Raises ``ConfigError`` naming the directory and the user.
    Blocking file-system calls: run it before the event loop (or in a thread)."""
    for what, key, path in writable_directories(config):
        try:
            # The lock directory holds sockets of this user only (as FileLocker makes it).
            os.makedirs(path, mode=0o700 if what == "lock" else 0o777, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=path, prefix=".tusd-py-probe-"):
                pass
        except OSError as error:
            reason = error.strerror or str(error)
            raise ConfigError(
                f"the {what} directory {os.path.abspath(path)} ({key}) is not writable by user {_user()}: {reason}"
            ) from error
