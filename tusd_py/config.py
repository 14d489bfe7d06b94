"""Typed configuration: defaults < config.toml < environment < CLI flags.

Every key lives in one dataclass below, with its default and why. Unknown keys in a
file or a ``TUSD_PY_*`` variable are errors that name the key. Environment variables
are ``TUSD_PY_<SECTION>_<KEY>`` upper-cased, dots as underscores, e.g.
``TUSD_PY_SERVER_PORT=8080`` or ``TUSD_PY_STORE_S3_BUCKET=uploads``.

Sizes accept a whole number of bytes or a string with a unit: IEC ``"8MiB"`` (8 x 1024^2)
or SI ``"8MB"`` (8 x 1000^2), see ``SIZE_UNITS``; fractions and other units are errors.
Durations are seconds (int or float).
"""

from __future__ import annotations

import dataclasses
import os
import re
import tomllib
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tusd_py.http.limits import HTTPLimits

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB
TiB = 1024 * GiB

ENV_PREFIX = "TUSD_PY_"


class ConfigError(Exception):
    """The configuration is invalid; the message names the key and the problem."""


class Size(int):
    """A byte count; accepts ``"8MiB"``-style strings in config files and variables."""


SIZE_UNITS = {
    "": 1, "B": 1,
    "kB": 1000, "KB": 1000, "MB": 1000**2, "GB": 1000**3, "TB": 1000**4,
    "KiB": KiB, "MiB": MiB, "GiB": GiB, "TiB": TiB,
}
"""The units a size may carry, spelled exactly so: SI (powers of 1000, "kB" or "KB")
and IEC (powers of 1024). Bare "K"/"M"/"G", lower-case "mb" (millibits) and "Mb"
(megabits) mean nothing else with any certainty, so they are refused."""

_SIZE_FORM = re.compile(r"([0-9]+) ?([A-Za-z]*)")
_SIZE_HINT = (
    "a whole number of bytes or a string like \"8MiB\", \"8 MiB\", \"8MB\" "
    "(units B, kB, MB, GB, TB, KiB, MiB, GiB, TiB)"
)


def parse_size(value: object, key: str) -> Size:
    """Parse ``8388608``, ``"8388608"``, ``"8MiB"``, ``"8 MiB"`` or ``"8MB"`` (see
    ``SIZE_UNITS``) into a byte count; anything else (a fraction, an unknown or
    ambiguous unit, a negative number) is a ``ConfigError`` naming ``key``."""
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 0:
            raise ConfigError(f"{key}: must not be negative, got {value}")
        return Size(value)
    if not isinstance(value, str):
        raise ConfigError(f"{key}: expected {_SIZE_HINT}, got {value!r}")
    match = _SIZE_FORM.fullmatch(value.strip())
    if match is None:
        raise ConfigError(f"{key}: expected {_SIZE_HINT}, got {value!r}")
    number, unit = match.groups()
    if unit not in SIZE_UNITS:
        raise ConfigError(f"{key}: unknown size unit {unit!r} in {value!r}; expected {_SIZE_HINT}")
    return Size(int(number) * SIZE_UNITS[unit])


_HTTP_DEFAULTS = HTTPLimits()
"""The HTTP layer owns the defaults of its limits and the reasons for them
(``tusd_py.http.limits``); the ``[server]`` keys that set them start from these."""


@dataclass
class ServerConfig:
    """``[server]``. The HTTP limits among these keys (timeouts, sizes, connections)
    take their defaults from ``HTTPLimits``, which says why each is what it is."""

    host: str = "127.0.0.1"
    """Listen address. Loopback by default: put nginx in front, or set 0.0.0.0."""
    port: int = 1080
    base_path: str = "/files/"
    """URL path under which uploads live; always ends with '/'."""
    behind_proxy: bool = False
    """Trust Forwarded / X-Forwarded-Host / X-Forwarded-Proto when building URLs.
    Enable only behind a proxy that sets them."""
    max_size: Size = Size(0)
    """Largest upload accepted (Tus-Max-Size). 0: no limit beyond the store's own
    (S3: 5 TiB per object)."""
    network_timeout: float = _HTTP_DEFAULTS.body_timeout
    """Seconds a request body may stall (no byte arriving) before the PATCH is ended
    and what arrived is stored. The HTTP layer calls it ``body_timeout``; this key keeps
    tusd's name (``-network-timeout``)."""
    header_timeout: float = _HTTP_DEFAULTS.header_timeout
    """Seconds a client has to send the request line and headers."""
    keepalive_timeout: float = _HTTP_DEFAULTS.keepalive_timeout
    """Seconds an idle keep-alive connection is kept open."""
    max_header_size: Size = Size(_HTTP_DEFAULTS.max_header_size)
    """Largest request line + headers; larger gets 431."""
    max_connections: int = _HTTP_DEFAULTS.max_connections
    """Open connections above this are refused (closed at accept)."""
    drain_limit: Size = Size(_HTTP_DEFAULTS.drain_limit)
    """After an early response, read and discard at most this much of the unread
    body to keep the connection alive; more than that and the connection is closed."""
    shutdown_timeout: float = 30.0
    """On SIGTERM/SIGINT: seconds running requests get to store what they received."""
    workers: int = 1
    """Worker processes accepting on one socket, which their supervisor binds (so a
    port another process holds is "address already in use", never shared). >1 needs a
    lock backend shared between processes (file, consul, redis or s3)."""
    interim_responses: str = "auto"
    """Whether the IETF draft's ``104 (Upload Resumption Supported)`` interim response
    is sent: "auto" (only when behind_proxy is false), "always" or "never". Proxies
    that do not understand it (nginx 1.22, Debian's) take the 104 for the final answer
    and desynchronise the upstream connection: every following request on it stalls
    until keepalive_timeout. Set "always" only behind a proxy that forwards 1xx
    responses. ("100 Continue" is not affected: it answers a client's Expect.)"""

    def sends_interim_responses(self) -> bool:
        """Whether ``interim_responses`` lets the server send a 104."""
        if self.interim_responses == "auto":
            return not self.behind_proxy
        return self.interim_responses == "always"

    def http_limits(self) -> HTTPLimits:
        """The limits the HTTP layer enforces, from these keys (``network_timeout`` is
        its ``body_timeout``); the limits without a key keep their defaults."""
        return dataclasses.replace(
            _HTTP_DEFAULTS,
            max_header_size=self.max_header_size,
            header_timeout=self.header_timeout,
            keepalive_timeout=self.keepalive_timeout,
            body_timeout=self.network_timeout,
            max_connections=self.max_connections,
            drain_limit=self.drain_limit,
        )


@dataclass
class FileStoreConfig:
    directory: str = "./data"


@dataclass
class S3StoreConfig:
    bucket: str = ""
    prefix: str = ""
    """Key prefix for every object of this server (e.g. "uploads/")."""
    object_key: str = "{id}"
    """The final object's key under ``prefix``: {id}, {metadata.NAME}, {date:%Y/%m/%d}
    (see tusd_py/stores/s3_keys.py); a pre-create hook may choose it instead."""
    metadata_prefix: str = ""
    """Where each upload's .info and tail segments live, by upload id. Empty: ``prefix``."""
    endpoint_url: str = ""
    """For S3-compatible services (MinIO, R2, Backblaze, Ceph); enables path-style
    addressing. Empty: AWS."""
    region: str = ""
    """Empty: from the standard AWS chain (AWS_REGION, profile), else us-east-1."""
    part_size: Size = Size(8 * MiB)
    """Preferred part size. Raised per upload so no upload needs a 10,001st part."""
    max_buffered_parts: int = 4
    """Spool ring slots per PATCH: parts received but not yet uploaded. A full ring
    pauses the client's socket."""
    max_concurrent_part_uploads: int = 8
    """UploadPart calls in flight across the whole process."""
    spool: str = "file"
    """Where received parts wait for upload: "file" (spool_dir) or "memory"."""
    spool_dir: str = ""
    """Empty: the system temp directory."""
    spool_memory: Size = Size(24 * MiB)
    """With the file spool: bytes of parts the process keeps in memory, a whole part
    per slot, before slots go to files; a few uploads at once then skip the file's
    write and read back. 0: every slot in a file."""
    tail_cache_size: Size = Size(64 * MiB)
    """Bytes of recently written tail segments kept in memory so this instance need
    not read them back from S3 when they complete a part. 0 disables."""
    deferred_length_ceiling: Size = Size(0)
    """Largest total length of an upload whose length is deferred; it fixes the part
    size of such uploads. 0: max_size if set, else part_size x 10,000."""
    request_timeout: float = 30.0
    """Seconds one S3 request may take from start to answer, sending its body
    included; for bodies larger than part_size (parts raised for very large uploads)
    it grows in proportion. 30 s carries an 8 MiB part at 2.2 Mbit/s (about
    280 KiB/s), far below any link a server should use to S3, while a stalled
    endpoint costs at most 30 s per attempt (5 attempts, then 503)."""
    checksum: str = "crc32c"
    """Integrity checksum sent with every UploadPart and PutObject, computed once
    while the part is spooled: "crc64nvme", "crc32c", "crc32", "sha256", "md5"
    (Content-MD5) or "none". S3 rejects a body that does not match it."""
    payload_signing: str = "auto"
    """"auto": SigV4 signs the body's SHA-256 over plain http, not over https with a
    checksum (UNSIGNED-PAYLOAD); "always"; "never" (needs a checksum)."""
    ca_bundle: str = ""
    """PEM file of the CAs trusted for an https endpoint_url. Empty: AWS_CA_BUNDLE,
    else the system's."""


@dataclass
class StoreConfig:
    backend: str = "file"
    """"file" (embedded default) or "s3"."""
    file: FileStoreConfig = field(default_factory=FileStoreConfig)
    s3: S3StoreConfig = field(default_factory=S3StoreConfig)


@dataclass
class FileLockConfig:
    directory: str = ""
    """Lock files live here. Empty: "<store.file.directory>/.locks"; for the S3 store
    "<system temp dir>/tusd-py-locks-<hash of endpoint, bucket and prefix>", which every
    tusd-py process of this host serving the same uploads derives alike (whatever its
    port). Under systemd's PrivateTmp each unit has its own temp dir: set a directory
    if several units on one host share a bucket (or use consul)."""


@dataclass
class ConsulLockConfig:
    address: str = "127.0.0.1:8500"
    """host:port of the local Consul agent."""
    scheme: str = "http"
    token: str = ""
    """ACL token; prefer the CONSUL_HTTP_TOKEN variable over writing it here."""
    key_prefix: str = "tusd-py/"
    session_ttl: float = 15.0
    """Session TTL in seconds (Consul accepts 10 to 86400); renewed every ttl/3."""
    lock_delay: float = 1.0
    """Seconds Consul refuses a lock after its holder's session was invalidated."""
    behavior: str = "release"
    """What Consul does with held locks when the session is invalidated:
    "release" or "delete"."""
    request_timeout: float = 5.0
    """Seconds one Consul call may take before Consul counts as unreachable (the
    request then gets 503 and nothing is written). Blocking queries get this on top of
    their wait. A local agent answers in milliseconds; 5 s rides out a leader election."""


@dataclass
class S3LockConfig:
    prefix: str = ""
    """Key prefix of the lock objects in the store's bucket. Empty:
    "<store.s3.prefix>.locks/"."""
    lease: float = 15.0
    """Seconds a lock outlives its holder's last renewal, by S3's clock (renewed every
    lease/3). A crashed instance's locks are taken over after this (+1 s)."""
    poll_interval: float = 1.0
    """Seconds between a holder's looks for release requests (one GET each) and a
    waiter's looks at the lock. The main S3 request cost of holding a lock."""
    request_timeout: float = 3.0
    """Seconds one S3 lock call may take before S3 counts as unreachable (503). Must
    be under lease/2, so that a renewal can be tried twice within a lease."""


@dataclass
class RedisLockConfig:
    url: str = "redis://127.0.0.1:6379/0"
    """One Redis endpoint: redis://[user:password@]host:port/db, or rediss:// for
    TLS. Logged with the password masked."""
    password: str = ""
    """Empty: the URL's password, if any. Prefer the TUSD_PY_LOCK_REDIS_PASSWORD
    variable over writing it here or in the URL."""
    key_prefix: str = "tusd-py:"
    """Prefix of the lock keys and release-request channels; give servers that do not
    share uploads different prefixes on a shared Redis."""
    lease: float = 15.0
    """Seconds a lock outlives a holder that stopped renewing it (a crashed host);
    renewed every lease/3. A holder that could not renew for a whole lease stops."""
    request_timeout: float = 2.0
    """Seconds one Redis command may take before Redis counts as unreachable (the
    request then gets 503 and nothing is written). At most lease/3, so a slow renewal
    still lands in time."""


@dataclass
class LockConfig:
    backend: str = "memory"
    """"memory" (one process), "file" (workers on one host), "consul", "redis" or "s3"
    (several hosts; "s3" needs store.backend = "s3")."""
    acquire_timeout: float = 20.0
    """Seconds a request waits for a held lock (after asking the holder to release)
    before it gets 423."""
    file: FileLockConfig = field(default_factory=FileLockConfig)
    consul: ConsulLockConfig = field(default_factory=ConsulLockConfig)
    s3: S3LockConfig = field(default_factory=S3LockConfig)
    redis: RedisLockConfig = field(default_factory=RedisLockConfig)


@dataclass
class CorsConfig:
    enabled: bool = True
    allow_origins: list[str] = field(default_factory=lambda: ["*"])
    """Origins allowed to use the API from a browser; ["*"] allows any."""
    allow_credentials: bool = False
    max_age: int = 86400
    """Seconds browsers may cache a preflight answer."""
    allow_headers: list[str] = field(default_factory=list)
    """Request headers browsers may send besides tus's own (e.g. an API key header
    the application sets through tus-js-client's ``headers`` option)."""
    expose_headers: list[str] = field(default_factory=list)
    """Response headers browser script may read besides tus's own."""


@dataclass
class LogConfig:
    level: str = "info"
    """debug, info, warning, error."""
    format: str = "text"
    """"text" or "json" (one JSON object per line)."""


@dataclass
class MetricsConfig:
    enabled: bool = True
    """Serve Prometheus metrics at ``path`` on the server's own port. The numbers are
    collected either way (it costs next to nothing); this only exposes them. Keep the
    path away from the internet (nginx: answer 404 for it, or allow only scrapers)."""
    path: str = "/metrics"
    """Answered before upload URLs; keep it outside server.base_path so it never
    shadows an upload id."""


HOOK_EVENT_NAMES = (
    "pre-create", "post-create", "post-receive", "pre-finish", "post-finish", "pre-terminate", "post-terminate",
    "pre-access",
)
# pre-finish and pre-terminate make requests wait for the receiver: opt-in (as in tusd),
# so a receiver written for the other events is not suddenly asked to decide.
DEFAULT_HOOK_EVENTS = ("pre-create", "post-create", "post-receive", "post-finish", "post-terminate")


@dataclass
class HooksConfig:
    url: str = ""
    """Webhook endpoint that receives hook events as JSON POSTs (http or https;
    user:password@ in the URL becomes Basic auth). Empty: no webhooks."""
    events: list[str] = field(default_factory=lambda: list(DEFAULT_HOOK_EVENTS))
    """Events POSTed to ``url``: pre-create, post-create, post-receive, pre-finish,
    post-finish, pre-terminate, post-terminate, pre-access. pre-finish, pre-terminate
    and pre-access (blocking, like pre-create) are off unless listed."""
    timeout: float = 5.0
    """Seconds one delivery attempt may take. pre-create makes the creating request
    wait up to (retries + 1) x timeout plus the backoff delays."""
    retries: int = 2
    """Further attempts after a connection error, a timeout or a 408/425/429/5xx."""
    retry_backoff: float = 0.5
    """Seconds before the first retry; doubles for each further one (at most 30)."""
    progress_interval: float = 1.0
    """Minimum seconds between two post-receive events of one upload."""
    secret: str = ""
    """When set, each POST carries ``Tusd-Py-Signature: sha256=<hex HMAC-SHA256 of the
    body with this key>`` so the receiver can check it came from us. Prefer the
    TUSD_PY_HOOKS_SECRET variable over writing it here."""
    max_pending: int = 1000
    """post-* events waiting for delivery; more are dropped (and logged) so a receiver
    that is down cannot fill memory."""
    max_concurrent_deliveries: int = 4
    """post-* deliveries in flight at once (they are not ordered; each event carries
    the upload's offset and an event_id)."""
    strip_headers: list[str] = field(default_factory=list)
    """Request headers (case-insensitive names) never sent to the webhook. Empty: the
    receiver gets every header, Authorization and Cookie included, so that it can
    authenticate the client (it is the operator's own backend; use https and
    ``secret``)."""
    access_cache_ttl: float = 5.0
    """Seconds a pre-access "allow" is reused for the same upload, access mode and
    credentials (``credential_headers``), so a client sending many chunks does not wait
    for the receiver on every PATCH. 0: ask on every request. Rejections are never
    reused; a DELETE or the upload's completion forgets its entries."""
    credential_headers: list[str] = field(default_factory=lambda: ["authorization", "cookie"])
    """The request headers that say who the client is: a cached pre-access "allow" is
    reused only for a request whose values of these headers are the same. List every
    header your receiver authenticates with (e.g. x-api-key)."""


@dataclass
class ExpirationConfig:
    lifetime: float = 0.0
    """Seconds an unfinished upload lives after creation. 0: uploads never expire."""
    sweep_interval: float = 0.0
    """Seconds between in-server sweeps of expired uploads. 0: no sweeper (run
    `tusd-py cleanup` from a timer instead)."""
    orphan_grace: float = 3600.0
    """Seconds before storage without an info document (a data file or an S3
    multipart upload whose ``.info`` is missing, a crashed concatenation's temporary
    data) counts as orphaned and is removed by a sweep. A creation writes its storage
    first and its info document last, a moment later; an hour keeps every sweep clear
    of creations in progress, even with skewed clocks."""


@dataclass
class ChecksumConfig:
    max_buffered_size: Size = Size(64 * MiB)
    """Largest request body that may carry Upload-Checksum (413 above it). Such a body
    is held in a temporary file until its digest is verified, on every store, so that
    a mismatch stores nothing; the bound is that file's size. Clients that checksum
    send chunks below it (tus-js-client's chunkSize)."""
    spool_dir: str = ""
    """Directory of those temporary files (anonymous: gone when closed, also after a
    crash). Empty: the system temp directory."""


@dataclass
class Config:
    server: ServerConfig = field(default_factory=ServerConfig)
    store: StoreConfig = field(default_factory=StoreConfig)
    lock: LockConfig = field(default_factory=LockConfig)
    cors: CorsConfig = field(default_factory=CorsConfig)
    log: LogConfig = field(default_factory=LogConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    hooks: HooksConfig = field(default_factory=HooksConfig)
    expiration: ExpirationConfig = field(default_factory=ExpirationConfig)
    checksum: ChecksumConfig = field(default_factory=ChecksumConfig)


# --- loading -------------------------------------------------------------------------

def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _is_section(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _convert(value: Any, tp: Any, key: str, from_text: bool) -> Any:
    """Convert a TOML value (or, with ``from_text``, an environment/CLI string)."""
    if tp is Size:
        return parse_size(value, key)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if from_text and str(value).lower() in {"1", "true", "yes", "on"}:
            return True
        if from_text and str(value).lower() in {"0", "false", "no", "off"}:
            return False
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if from_text and re.fullmatch(r"-?[0-9]+", str(value).strip()):
            return int(value)
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if from_text:
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number of seconds, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    origin = typing.get_origin(tp)
    if origin is list:
        if from_text and isinstance(value, str):
            return [item.strip() for item in value.split(",") if item.strip()]
        if isinstance(value, list) and all(isinstance(item, str) for item in value):
            return list(value)
        raise ConfigError(f"{key}: expected a list of strings, got {value!r}")
    if isinstance(tp, types.UnionType):  # pragma: no cover - no optional keys yet
        raise ConfigError(f"{key}: unsupported type")
    raise ConfigError(f"{key}: unsupported type {tp!r}")


def _apply_table(section: Any, table: Mapping[str, Any], path: str) -> None:
    hints = _field_types(type(section))
    for name, value in table.items():
        key = f"{path}.{name}" if path else name
        if name not in hints:
            raise ConfigError(f"unknown config key {key!r}")
        tp = hints[name]
        if _is_section(tp):
            if not isinstance(value, dict):
                raise ConfigError(f"{key}: expected a table [{key}]")
            _apply_table(getattr(section, name), value, key)
        else:
            setattr(section, name, _convert(value, tp, key, from_text=False))


def all_keys(config: Config | None = None) -> dict[str, tuple[Any, Any]]:
    """Every leaf key as ``"section.sub.key" -> (owning section object, type)``."""
    root = config if config is not None else Config()
    keys: dict[str, tuple[Any, Any]] = {}

    def walk(section: Any, path: str) -> None:
        for name, tp in _field_types(type(section)).items():
            key = f"{path}.{name}" if path else name
            if _is_section(tp):
                walk(getattr(section, name), key)
            else:
                keys[key] = (section, tp)

    walk(root, "")
    return keys


def env_name(key: str) -> str:
    """``"store.s3.bucket"`` -> ``"TUSD_PY_STORE_S3_BUCKET"``."""
    return ENV_PREFIX + key.replace(".", "_").upper()


def set_key(config: Config, key: str, value: Any, from_text: bool = True) -> None:
    """Set one dotted key (used for environment variables and CLI flags)."""
    keys = all_keys(config)
    if key not in keys:
        raise ConfigError(f"unknown config key {key!r}")
    section, tp = keys[key]
    setattr(section, key.rsplit(".", 1)[-1], _convert(value, tp, key, from_text=from_text))


def load_config(
    path: str | Path | None = None,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Config:
    """Build the config: defaults, then the TOML file at ``path`` (if given), then
    ``TUSD_PY_*`` variables from ``environ``, then ``overrides`` (dotted key -> value,
    from CLI flags). Raises ``ConfigError`` naming the offending key."""
    config = Config()
    if path is not None:
        try:
            with open(path, "rb") as file:
                table = tomllib.load(file)
        except FileNotFoundError as error:
            raise ConfigError(f"config file not found: {path}") from error
        except tomllib.TOMLDecodeError as error:
            raise ConfigError(f"{path}: invalid TOML: {error}") from error
        _apply_table(config, table, "")
    environ = os.environ if environ is None else environ
    names = {env_name(key): key for key in all_keys(config)}
    for name, value in environ.items():
        if not name.startswith(ENV_PREFIX):
            continue
        if name not in names:
            raise ConfigError(f"unknown config variable {name} (no such key)")
        set_key(config, names[name], value, from_text=True)
    for key, value in (overrides or {}).items():
        set_key(config, key, value, from_text=isinstance(value, str))
    from tusd_py.config_checks import validate  # it imports this module

    validate(config)
    return config
