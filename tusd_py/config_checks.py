"""Cross-field checks of the configuration (``validate``), each failing with one line
an operator can act on. ``config.load_config`` runs them after every source is read."""

from __future__ import annotations

import os
import re
import urllib.parse

from tusd_py.config import (
    HOOK_EVENT_NAMES,
    Config,
    ConfigError,
    ConsulLockConfig,
    GiB,
    HooksConfig,
    MiB,
    RedisLockConfig,
    S3StoreConfig,
)
from tusd_py.stores.s3_checksum import CHECKSUMS
from tusd_py.stores.s3_keys import ObjectKeyTemplate


def validate(config: Config) -> None:
    """Cross-field checks, each with a message an operator can act on."""
    server = config.server
    if not server.base_path.startswith("/"):
        raise ConfigError("server.base_path must start with '/'")
    if not server.base_path.endswith("/"):
        server.base_path += "/"
    if not 0 <= server.port <= 65535:
        raise ConfigError(f"server.port must be 0-65535, got {server.port}")
    if server.workers < 1:
        raise ConfigError("server.workers must be at least 1")
    for name in ("network_timeout", "header_timeout", "keepalive_timeout", "shutdown_timeout"):
        if getattr(server, name) <= 0:
            raise ConfigError(f"server.{name} must be positive")
    if server.max_connections < 1:
        raise ConfigError("server.max_connections must be at least 1")
    if server.interim_responses not in {"auto", "always", "never"}:
        raise ConfigError(
            f"server.interim_responses must be \"auto\", \"always\" or \"never\", got {server.interim_responses!r}"
        )
    if config.store.backend not in {"file", "s3"}:
        raise ConfigError(f"store.backend must be \"file\" or \"s3\", got {config.store.backend!r}")
    if config.store.backend == "s3" and not config.store.s3.bucket:
        raise ConfigError("store.s3.bucket is required when store.backend = \"s3\"")
    s3 = config.store.s3
    if s3.part_size < 5 * MiB or s3.part_size > 5 * GiB:
        raise ConfigError("store.s3.part_size must be between 5MiB and 5GiB (S3 part limits)")
    if s3.spool not in {"file", "memory"}:
        raise ConfigError(f"store.s3.spool must be \"file\" or \"memory\", got {s3.spool!r}")
    if s3.max_buffered_parts < 1 or s3.max_concurrent_part_uploads < 1:
        raise ConfigError("store.s3.max_buffered_parts and max_concurrent_part_uploads must be at least 1")
    if s3.deferred_length_ceiling and s3.deferred_length_ceiling < s3.part_size:
        raise ConfigError("store.s3.deferred_length_ceiling must be 0 (automatic) or at least store.s3.part_size")
    _validate_s3_endpoint(s3.endpoint_url)
    _validate_s3_integrity(s3)
    problem = s3_keys_problem(s3)
    if problem:
        raise ConfigError(problem)
    if s3.request_timeout <= 0:
        raise ConfigError("store.s3.request_timeout must be positive")
    if config.lock.backend not in {"memory", "file", "consul", "redis", "s3"}:
        raise ConfigError(
            "lock.backend must be \"memory\", \"file\", \"consul\", \"redis\" or \"s3\", "
            f"got {config.lock.backend!r}"
        )
    if config.lock.backend == "s3":
        _validate_s3_lock(config)
    if server.workers > 1 and config.lock.backend == "memory":
        raise ConfigError(
            "server.workers > 1 needs a lock shared between processes: "
            "set lock.backend = \"file\" (one host), \"consul\", \"redis\" or \"s3\" (several hosts)"
        )
    if config.lock.acquire_timeout <= 0:
        raise ConfigError("lock.acquire_timeout must be positive")
    if config.lock.consul.behavior not in {"release", "delete"}:
        raise ConfigError("lock.consul.behavior must be \"release\" or \"delete\"")
    if not 10 <= config.lock.consul.session_ttl <= 86400:
        raise ConfigError("lock.consul.session_ttl must be between 10 and 86400 seconds (Consul's range)")
    _validate_consul_lock(config.lock.consul)
    _validate_redis_lock(config.lock.redis)
    if config.log.level.lower() not in {"debug", "info", "warning", "error"}:
        raise ConfigError(f"log.level must be debug, info, warning or error, got {config.log.level!r}")
    if config.log.format not in {"text", "json"}:
        raise ConfigError(f"log.format must be \"text\" or \"json\", got {config.log.format!r}")
    if not config.metrics.path.startswith("/"):
        raise ConfigError("metrics.path must start with '/'")
    _validate_hooks(config.hooks)
    for name in ("allow_headers", "expose_headers"):
        bad = [header for header in getattr(config.cors, name) if not _HEADER_NAME.fullmatch(header)]
        if bad:
            raise ConfigError(f"cors.{name}: {bad[0]!r} is not an HTTP header name")
    if config.expiration.lifetime < 0 or config.expiration.sweep_interval < 0 or config.expiration.orphan_grace < 0:
        raise ConfigError("expiration.lifetime, sweep_interval and orphan_grace must not be negative")
    if config.checksum.max_buffered_size < 1:
        raise ConfigError("checksum.max_buffered_size must be at least 1 byte")


_HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
"""An RFC 9110 token: what a header name may be."""


def _validate_s3_endpoint(url: str) -> None:
    if not url:
        return
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in {"http", "https"} or not parts.netloc:
        raise ConfigError(
            f"store.s3.endpoint_url must be a URL starting with http:// or https:// "
            f"(e.g. http://127.0.0.1:9000), got {url!r}"
        )


def _validate_s3_integrity(s3: S3StoreConfig) -> None:
    if s3.checksum not in CHECKSUMS:
        raise ConfigError(f"store.s3.checksum must be one of {', '.join(CHECKSUMS)}, got {s3.checksum!r}")
    if s3.payload_signing not in {"auto", "always", "never"}:
        raise ConfigError(
            f"store.s3.payload_signing must be \"auto\", \"always\" or \"never\", got {s3.payload_signing!r}"
        )
    if s3.payload_signing == "never" and s3.checksum == "none":
        raise ConfigError(
            "store.s3.payload_signing = \"never\" needs a store.s3.checksum (nothing else would protect the bodies)"
        )
    if s3.ca_bundle and not os.path.isfile(s3.ca_bundle):
        raise ConfigError(f"store.s3.ca_bundle {s3.ca_bundle!r} is not a file (a PEM bundle of CA certificates)")


def _validate_hooks(hooks: HooksConfig) -> None:
    if hooks.url and not hooks.url.startswith(("http://", "https://")):
        raise ConfigError("hooks.url must start with http:// or https://")
    unknown = [event for event in hooks.events if event not in HOOK_EVENT_NAMES]
    if unknown:
        raise ConfigError(f"hooks.events: unknown event {unknown[0]!r}; expected some of {', '.join(HOOK_EVENT_NAMES)}")
    if hooks.timeout <= 0:
        raise ConfigError("hooks.timeout must be positive")
    if hooks.retries < 0 or hooks.retry_backoff < 0 or hooks.progress_interval < 0:
        raise ConfigError("hooks.retries, hooks.retry_backoff and hooks.progress_interval must not be negative")
    if hooks.max_pending < 1 or hooks.max_concurrent_deliveries < 1:
        raise ConfigError("hooks.max_pending and hooks.max_concurrent_deliveries must be at least 1")
    if hooks.access_cache_ttl < 0:
        raise ConfigError("hooks.access_cache_ttl must not be negative")
    for name in ("strip_headers", "credential_headers"):
        bad = [header for header in getattr(hooks, name) if not _HEADER_NAME.fullmatch(header)]
        if bad:
            raise ConfigError(f"hooks.{name}: {bad[0]!r} is not an HTTP header name")


def _validate_s3_lock(config: Config) -> None:
    s3 = config.lock.s3
    if config.store.backend != "s3":
        raise ConfigError(
            "lock.backend = \"s3\" needs store.backend = \"s3\" "
            "(the file store is one host: use lock.backend = \"file\")"
        )
    if s3.lease < 2:
        raise ConfigError("lock.s3.lease must be at least 2 seconds (S3's clock has whole seconds)")
    if not 0 < s3.request_timeout < s3.lease / 2:
        raise ConfigError("lock.s3.request_timeout must be positive and under lock.s3.lease / 2")
    if s3.poll_interval <= 0:
        raise ConfigError("lock.s3.poll_interval must be positive")
    if s3.prefix.startswith("/"):
        raise ConfigError("lock.s3.prefix must not start with '/' (S3 keys have no leading slash)")


def _validate_consul_lock(consul: ConsulLockConfig) -> None:
    address = consul.address.rsplit(":", 1)
    if len(address) != 2 or not address[0] or not address[1].isdigit():
        raise ConfigError(f"lock.consul.address must be host:port, got {consul.address!r}")
    if consul.scheme not in {"http", "https"}:
        raise ConfigError(f"lock.consul.scheme must be \"http\" or \"https\", got {consul.scheme!r}")
    if consul.key_prefix.startswith("/"):
        raise ConfigError("lock.consul.key_prefix must not start with '/' (Consul keys have no leading slash)")
    if not 0 <= consul.lock_delay <= 60:
        raise ConfigError("lock.consul.lock_delay must be between 0 and 60 seconds (Consul's range)")
    if consul.request_timeout <= 0:
        raise ConfigError("lock.consul.request_timeout must be positive")


def _validate_redis_lock(redis: RedisLockConfig) -> None:
    scheme, _, rest = redis.url.partition("://")
    if scheme not in {"redis", "rediss"} or not rest:
        raise ConfigError("lock.redis.url must start with redis:// or rediss:// (one Redis endpoint)")
    if redis.lease < 1:
        raise ConfigError("lock.redis.lease must be at least 1 second")
    if not 0 < redis.request_timeout <= redis.lease / 3:
        raise ConfigError("lock.redis.request_timeout must be positive and at most lock.redis.lease / 3")


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
