"""S3 ingest benchmark: tusd-py's S3 store against moto, next to the limit and the peer.

Same workloads and client as ``benchmarks/ingest.py`` (one PATCH of ``--size``, and the
same bytes as PATCHes of ``--patch-size`` on one keep-alive connection), sent to:

- ``limit``: no tus server: the harness uploads the same bytes straight to the same
  endpoint with aiobotocore as one multipart upload (parts of ``--part-size``, at most
  ``--concurrency`` UploadPart calls in flight, the ``--checksum`` on every part and
  the body signed or not, as tusd-py's
  S3 store sends them). The best any server in front of this endpoint could do.
- ``tusd-py``: ``python -m tusd_py.cli --store s3`` with the same part size and
  concurrency.
- ``peer`` (``--peer``): @tus/server + @tus/s3-store (``benchmarks/peers/tus_server.mjs``).

The endpoint is moto in server mode on a loopback port; with ``--tls``, nginx terminating
TLS in front of it (``benchmarks/tls.py``), as production reaches S3. moto keeps objects in memory and
tops out near 100 MB/s, so absolute MB/s here say nothing about S3; the ratios to the
limit say how much a server loses in front of a given endpoint, and the CPU and RSS
columns are the server's own cost. The moto process's CPU is reported separately.

    python -m benchmarks.s3 --runs 3 --peer
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import hashlib
import os
import re
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import botocore.session
from aiobotocore.config import AioConfig
from aiobotocore.session import get_session
from awscrt import checksums as crt_checksums

from benchmarks.accounting import accounted
from benchmarks.common import (
    MB,
    PEERS_DIR,
    GiB,
    MiB,
    ServerFailed,
    ServerGroup,
    ServerProcess,
    command_from_template,
    environment,
    finish_report,
    free_port,
    load_average,
    median,
    parse_size,
    random_buffer,
)
from benchmarks.countproxy import CountingProxy
from benchmarks.ingest import HOST, Results, measure_server, upload_to
from benchmarks.loads import Concurrent, measure_concurrent
from benchmarks.measurement import HEADER, Measurement, Workload, format_row, median_figures, median_row
from benchmarks.tls import tls_terminator

BUCKET = "tusd-py-bench"
REGION = "us-east-1"
# moto accepts any credentials; fixed ones keep the developer's real AWS variables and
# profile out of the benchmark (and out of its subprocesses).
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_REGION": REGION}

MOTO_CMD = f"{sys.executable} -m moto.server -H {{host}} -p {{port}}"
DEFAULT_SERVER_CMD = f"{sys.executable} -m tusd_py.cli --host {{host}} --port {{port}} --store s3 --log-level warning"
DEFAULT_PEER_CMD = (f"node {PEERS_DIR / 'tus_server.mjs'} --host {{host}} --port {{port}} --store s3 "
                    f"--s3-endpoint {{endpoint}} --s3-bucket {{bucket}} --s3-part-size {{part_size}}")


@dataclass
class Options:
    """What to run, from the command line."""

    runs: int
    workloads: list[Workload]
    targets: list[str]
    part_size: int
    concurrency: int
    server_cmd: str
    peer_cmd: str
    client_buffer: int
    timeout: float
    work_dir: Path
    tls: bool = False
    """Reach moto through nginx terminating TLS (a CA made by the benchmark)."""
    checksum: str = "crc32c"
    """store.s3.checksum of the server, and the limit's part checksum."""
    concurrent: Concurrent | None = None
    """Also all these uploads at once into tusd-py (peak RSS of the file spool)."""


def _clean_environment() -> dict[str, str]:
    """This process's environment without AWS_* and TUSD_PY_* settings, plus moto's
    credentials: no benchmark subprocess may reach a real AWS account."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "TUSD_PY_"))}
    return env | CREDENTIALS


class Bucket:
    """Synchronous admin access to the benchmark bucket (create, empty, inspect)."""

    def __init__(self, endpoint: str, ca_bundle: Path | None = None) -> None:
        session = botocore.session.get_session()
        self._client = session.create_client(
            "s3", endpoint_url=endpoint, region_name=REGION, verify=str(ca_bundle) if ca_bundle else None,
            aws_access_key_id=CREDENTIALS["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
        )

    def create(self) -> None:
        self._client.create_bucket(Bucket=BUCKET)

    def object_sizes(self) -> dict[str, int]:
        """Key -> size of every object in the bucket."""
        sizes: dict[str, int] = {}
        for page in self._client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET):
            sizes.update({item["Key"]: item["Size"] for item in page.get("Contents", [])})
        return sizes

    def empty(self) -> None:
        """Delete every object and abort every multipart upload (moto holds them in RAM)."""
        for key in self.object_sizes():
            self._client.delete_object(Bucket=BUCKET, Key=key)
        uploads = self._client.list_multipart_uploads(Bucket=BUCKET).get("Uploads", [])
        for upload in uploads:
            self._client.abort_multipart_upload(Bucket=BUCKET, Key=upload["Key"], UploadId=upload["UploadId"])

    def check_complete_object(self, size: int, target: str) -> None:
        """Raise unless the bucket holds an object of exactly ``size`` bytes: the upload
        really ended as one complete S3 object."""
        sizes = self.object_sizes()
        if size not in sizes.values():
            raise ServerFailed(f"{target}: no object of {size} bytes in the bucket after the upload: {sizes}")


# --- the limit: aiobotocore multipart straight to the endpoint ----------------------------

def _repeat(buffer: memoryview, length: int) -> bytes:
    """``length`` bytes: ``buffer`` repeated as often as needed (a part may be larger
    than the client's buffer)."""
    whole, rest = divmod(length, len(buffer))
    return bytes(buffer) * whole + bytes(buffer[:rest])


_CHECKSUM_NAMES = {"crc32c": "CRC32C", "crc32": "CRC32", "crc64nvme": "CRC64NVME", "sha256": "SHA256"}


def _part_checksum(checksum: str, body: bytes) -> dict[str, str]:
    """The UploadPart parameter carrying ``body``'s ``checksum`` (as tusd-py sends it)."""
    if checksum == "none":
        return {}
    if checksum == "md5":
        return {"ContentMD5": base64.b64encode(hashlib.md5(body, usedforsecurity=False).digest()).decode()}
    if checksum == "sha256":
        digest = hashlib.sha256(body).digest()
    else:
        size = 8 if checksum == "crc64nvme" else 4
        digest = getattr(crt_checksums, checksum)(body).to_bytes(size, "big")
    return {f"Checksum{_CHECKSUM_NAMES[checksum]}": base64.b64encode(digest).decode()}


async def _multipart_upload(
    endpoint: str, size: int, part_size: int, concurrency: int, buffer: memoryview,
    checksum: str = "crc32c", ca_bundle: Path | None = None,
) -> float:
    """One multipart upload of ``size`` bytes with ``checksum`` on every part, body
    signing as tusd-py's "auto" (not over https with a checksum); returns the seconds
    from CreateMultipartUpload to CompleteMultipartUpload."""
    sign = not (endpoint.startswith("https://") and checksum != "none")
    config = AioConfig(
        s3={"addressing_style": "path", "payload_signing_enabled": sign},
        max_pool_connections=concurrency,
        # The checksum is sent explicitly, as tusd-py does; no second (CRC32) hash.
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
    )
    # The part bodies are cut from the preallocated buffer before timing; botocore needs
    # bytes-like bodies it can re-read on retry.
    lengths = [min(part_size, size - offset) for offset in range(0, size, part_size)]
    bodies = {length: _repeat(buffer, length) for length in set(lengths)}
    session = get_session()
    async with session.create_client(
        "s3", endpoint_url=endpoint, region_name=REGION, config=config,
        verify=str(ca_bundle) if ca_bundle else None,
        aws_access_key_id=CREDENTIALS["AWS_ACCESS_KEY_ID"], aws_secret_access_key=CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
    ) as client:
        start = time.perf_counter()
        extra = {"ChecksumAlgorithm": _CHECKSUM_NAMES[checksum]} if checksum in _CHECKSUM_NAMES else {}
        if checksum == "crc64nvme":
            extra["ChecksumType"] = "FULL_OBJECT"
        created = await client.create_multipart_upload(Bucket=BUCKET, Key="limit", **extra)
        upload_id = created["UploadId"]
        slots = asyncio.Semaphore(concurrency)

        async def upload_part(number: int, body: bytes) -> dict[str, Any]:
            async with slots:
                # Hash per part like a server must (it cannot know the bytes in advance);
                # in a thread, as hashlib and awscrt release the GIL on large buffers.
                sent = await asyncio.to_thread(_part_checksum, checksum, body)
                response = await client.upload_part(
                    Bucket=BUCKET, Key="limit", UploadId=upload_id, PartNumber=number, Body=body, **sent,
                )
                named = {key: value for key, value in sent.items() if key != "ContentMD5"}
                return {"PartNumber": number, "ETag": response["ETag"], **named}

        parts = await asyncio.gather(*(
            upload_part(index + 1, bodies[length]) for index, length in enumerate(lengths)
        ))
        await client.complete_multipart_upload(
            Bucket=BUCKET, Key="limit", UploadId=upload_id, MultipartUpload={"Parts": list(parts)},
        )
        return time.perf_counter() - start


def measure_limit(
    endpoint: str, moto: ServerProcess, workload: Workload, buffer: memoryview, options: Options,
    ca_bundle: Path | None = None,
) -> Measurement:
    """The limit: the harness itself uploads the workload's bytes to the endpoint."""
    with accounted(None, moto.pid) as cost:
        seconds = asyncio.run(
            _multipart_upload(endpoint, workload.size, options.part_size, options.concurrency, buffer,
                              options.checksum, ca_bundle)
        )
    assert cost.backend is not None
    gib = workload.size / GiB
    return Measurement(
        target="limit", workload=workload.name, bytes=workload.size, seconds=seconds,
        mb_per_s=workload.size / MB / seconds,
        server_cpu_s_per_gib=None, server_main_thread_busy=None, server_peak_rss_mib=None, server_hwm_mib=None,
        rss_samples=0, client_cpu_s_per_gib=cost.client_cpu_seconds / gib, other_cpu_s=cost.other_cpu_seconds,
        backend_cpu_s_per_gib=cost.backend.cpu_seconds / gib,
    )


@dataclass
class Traffic:
    """What one upload cost in S3 requests and bytes, seen between the server and moto."""

    target: str
    workload: str
    bytes: int
    bytes_to_s3: int
    bytes_from_s3: int
    requests: dict[str, int]
    """S3 requests by HTTP method, from moto's access log."""

    @property
    def up_ratio(self) -> float:
        """Bytes sent to S3 per byte uploaded: ~1 for one multipart upload; linear
        tail handling stays a small constant, quadratic handling grows with the size."""
        return self.bytes_to_s3 / self.bytes


class S3Targets(ServerGroup):
    """moto plus the S3 targets of one benchmark run (limit, tusd-py, peer): starts
    them on entry, creates the bucket, warms every target up, and measures one target
    on one workload at a time. ``s3.py`` and the suite share it."""

    def __init__(self, options: Options, buffer: memoryview) -> None:
        super().__init__()
        self.options = options
        self.buffer = buffer
        self.env = _clean_environment()
        moto_port = free_port(HOST)
        self.endpoint = f"http://{HOST}:{moto_port}"
        self.moto = ServerProcess("moto", command_from_template(MOTO_CMD, host=HOST, port=moto_port), HOST,
                                  moto_port, options.work_dir / "moto.log", env=self.env)
        (options.work_dir / "spool").mkdir(parents=True, exist_ok=True)
        self.tls: ServerProcess | None = None
        self.ca_bundle: Path | None = None
        if options.tls:
            self.tls, self.ca_bundle = tls_terminator(options.work_dir, HOST, moto_port)
            self.endpoint = f"https://{HOST}:{self.tls.port}"
        self.servers = {target: self._server(target, self.endpoint) for target in options.targets
                        if target != "limit"}
        self.bucket: Bucket | None = None

    def _server(self, target: str, endpoint: str, name: str | None = None) -> ServerProcess:
        """``target``'s server process (not started), storing into ``endpoint``."""
        port = free_port(HOST)
        name = name or target
        values = {"host": HOST, "port": port, "endpoint": endpoint, "bucket": BUCKET,
                  "part_size": self.options.part_size}
        if target == "tusd-py":
            template, env = self.options.server_cmd, self.env | {
                "TUSD_PY_STORE_S3_BUCKET": BUCKET,
                "TUSD_PY_STORE_S3_ENDPOINT_URL": endpoint,
                "TUSD_PY_STORE_S3_PART_SIZE": str(self.options.part_size),
                "TUSD_PY_STORE_S3_MAX_CONCURRENT_PART_UPLOADS": str(self.options.concurrency),
                "TUSD_PY_STORE_S3_SPOOL_DIR": str(self.options.work_dir / "spool"),
                "MALLOC_ARENA_MAX": "1",  # as systemd/tusd-py.service runs it
            }
            # Only when asked, so that --server-cmd can run a tusd-py from before the key.
            if self.options.checksum != "crc32c":
                env["TUSD_PY_STORE_S3_CHECKSUM"] = self.options.checksum
            if self.ca_bundle is not None and endpoint.startswith("https"):
                env["AWS_CA_BUNDLE"] = str(self.ca_bundle)  # what store.s3.ca_bundle defaults to
        else:
            template, env = self.options.peer_cmd, self.env
            if self.ca_bundle is not None and endpoint.startswith("https"):
                env = {**env, "NODE_EXTRA_CA_CERTS": str(self.ca_bundle)}  # the AWS SDK for JavaScript's trust
        return ServerProcess(name, command_from_template(template, **values), HOST, port,
                             self.options.work_dir / f"{name}.log", env=env)

    def __enter__(self) -> S3Targets:
        # moto first: the servers check the bucket when they start.
        self.moto.start()
        try:
            if self.tls is not None:
                self.tls.start()
            self.bucket = Bucket(self.endpoint, self.ca_bundle)
            self.bucket.create()
            self.start_all()
            # Unmeasured warm-up of every target (imports, connection pools, moto's
            # first bucket operations): the first upload to a fresh moto ran at half speed.
            warmup = Workload(size=min(16 * MiB, self.options.client_buffer), patch_size=16 * MiB)
            for target in self.options.targets:
                self.measure(target, warmup)
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop_all()
        if self.tls is not None:
            self.exit_codes["nginx-tls"] = self.tls.stop()
        self.exit_codes["moto"] = self.moto.stop()

    def restart(self, target: str) -> ServerProcess:
        """Replace ``target``'s server with a fresh one, warmed up by a 1 MiB upload: so
        a measurement's peak RSS is its own, not what earlier workloads left behind."""
        server = self.replace(target, self._server(target, self.endpoint))
        self.measure(target, Workload(size=MiB, patch_size=MiB))
        return server

    def measure(self, target: str, workload: Workload) -> Measurement:
        """Measure ``target`` taking ``workload`` once into an empty bucket, and check
        that the bucket then holds the complete object."""
        assert self.bucket is not None, "use S3Targets as a context manager"
        self.bucket.empty()
        if target == "limit":
            measurement = measure_limit(self.endpoint, self.moto, workload, self.buffer, self.options, self.ca_bundle)
        else:
            measurement = measure_server(self.servers[target], workload, self.buffer, self.options.timeout,
                                         backend_pid=self.moto.pid)
        self.bucket.check_complete_object(workload.size, target)
        self.bucket.empty()
        return measurement

    def measure_traffic(self, target: str, workload: Workload) -> Traffic:
        """Upload ``workload`` once through a counting proxy in front of moto (untimed:
        the proxy runs in this process and would slow the client) and return the S3
        traffic it caused. Servers get a fresh instance pointed at the proxy."""
        assert self.bucket is not None, "use S3Targets as a context manager"
        self.bucket.empty()
        with CountingProxy(HOST, self.moto.port) as proxy, contextlib.ExitStack() as stack:
            endpoint = f"http://{HOST}:{proxy.port}"
            server = None
            if target != "limit":
                server = stack.enter_context(self._server(target, endpoint, name=f"{target}-traffic"))
            # Counted from here: the server's start-up calls (bucket checks) are not the upload's.
            time.sleep(0.2)
            log_start, up_start, down_start = _size_or_zero(self.moto.log_path), proxy.bytes_up, proxy.bytes_down
            if server is None:
                asyncio.run(_multipart_upload(endpoint, workload.size, self.options.part_size,
                                              self.options.concurrency, self.buffer, self.options.checksum))
            else:
                upload_to(server, workload, self.buffer, self.options.timeout)
            bytes_up, bytes_down = proxy.bytes_up - up_start, proxy.bytes_down - down_start
            # moto logs a request after answering it: give the last line a moment, and
            # count before the server stops and the harness's checks add lines of their own.
            time.sleep(0.2)
            requests = _requests_in_log(self.moto.log_path, log_start)
        self.bucket.check_complete_object(workload.size, target)
        self.bucket.empty()
        return Traffic(target=target, workload=workload.name, bytes=workload.size,
                       bytes_to_s3=bytes_up, bytes_from_s3=bytes_down, requests=requests)


def _size_or_zero(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def _requests_in_log(path: Path, start: int) -> dict[str, int]:
    """S3 requests by method in moto's access log after byte ``start`` (werkzeug logs
    one line per request: ``... "PUT /bucket/key?partNumber=1 HTTP/1.1" 200 -``)."""
    counts: dict[str, int] = {}
    with open(path, "rb") as file:
        file.seek(start)
        for match in re.finditer(rb'"(GET|PUT|POST|HEAD|DELETE) /', file.read()):
            method = match.group(1).decode()
            counts[method] = counts.get(method, 0) + 1
    return counts


def run_benchmark(options: Options) -> Results:
    """Start moto and the servers, measure every target on every workload ``runs`` times."""
    results = Results(meta={
        **environment(),
        "runs": options.runs, "targets": options.targets,
        "workloads": [asdict(w) | {"name": w.name} for w in options.workloads],
        "part_size": options.part_size, "concurrency": options.concurrency,
        "server_cmd": options.server_cmd, "peer_cmd": options.peer_cmd if "peer" in options.targets else None,
        "load_average_before": load_average(),
    })
    targets = S3Targets(options, random_buffer(options.client_buffer))
    try:
        with targets:
            for run in range(options.runs):
                measurements: list[Measurement] = []
                for workload in options.workloads:
                    for target in options.targets:
                        measurement = targets.measure(target, workload)
                        measurements.append(measurement)
                        print(format_row(run + 1, measurement) + f" {fmt_backend(measurement):>14}", flush=True)
                results.runs.append(measurements)
            if options.concurrent is not None and "tusd-py" in options.targets:
                _measure_concurrent(targets, options.concurrent, results)
    finally:
        results.meta["server_exit_codes"] = targets.exit_codes
        results.meta["load_average_after"] = load_average()
    return results


def _measure_concurrent(targets: S3Targets, load: Concurrent, results: Results) -> None:
    """``load`` (all uploads at once) into a fresh tusd-py, ``runs`` times: its peak RSS
    is what the spool ring and the part bodies in flight cost."""
    rows = []
    for run in range(targets.options.runs):
        assert targets.bucket is not None
        targets.bucket.empty()
        server = targets.restart("tusd-py")
        row = measure_concurrent(server, "s3", run + 1, load, targets.buffer, targets.options.timeout)
        targets.bucket.empty()
        rows.append(row)
        print(f"  {run + 1}  {load.name}: {row.value:.0f} MB/s, server CPU {row.server_cpu or 0:.2f} s/GiB, "
              f"peak RSS {row.peak_rss_mib or 0:.1f} MiB", flush=True)
    results.meta["concurrent"] = [asdict(row) for row in rows]
    print(f"med  {load.name}: peak RSS {median([row.peak_rss_mib or 0.0 for row in rows]):.1f} MiB, "
          f"server CPU {median([row.server_cpu or 0.0 for row in rows]):.2f} s/GiB", flush=True)


def fmt_backend(measurement: Measurement) -> str:
    value = measurement.backend_cpu_s_per_gib
    return "-" if value is None else f"{value:.2f}"


def summarize(results: Results, options: Options) -> dict[str, Any]:
    """Medians of each figure, and medians of the same-run ratios to the limit and peer."""
    summary: dict[str, Any] = {"medians": {}, "ratios": {}}
    for workload in options.workloads:
        by_target: dict[str, dict[str, float]] = {}
        for target in options.targets:
            rows = [m for run in results.runs for m in run if m.target == target and m.workload == workload.name]
            by_target[target] = median_figures(rows)
        summary["medians"][workload.name] = by_target
        ratios: dict[str, list[float]] = {"tusd_py_over_limit": [], "tusd_py_over_peer": []}
        for run in results.runs:
            speeds = {m.target: m.mb_per_s for m in run if m.workload == workload.name}
            if "tusd-py" in speeds and "limit" in speeds:
                ratios["tusd_py_over_limit"].append(speeds["tusd-py"] / speeds["limit"])
            if "tusd-py" in speeds and "peer" in speeds:
                ratios["tusd_py_over_peer"].append(speeds["tusd-py"] / speeds["peer"])
        summary["ratios"][workload.name] = {
            name: {"per_run": values, "median": median(values)} for name, values in ratios.items() if values
        }
    return summary


def print_summary(summary: dict[str, Any], options: Options) -> None:
    print(f"\nmedians over {options.runs} run(s)")
    print(HEADER + f" {'moto CPU s/GiB':>14}")
    for workload, by_target in summary["medians"].items():
        for target, figures in by_target.items():
            row = median_row(target, workload, figures)
            print(format_row("med", row) + f" {fmt_backend(row):>14}")
    print("\nratios (median of per-run ratios)")
    for workload, ratios in summary["ratios"].items():
        for name, label in (("tusd_py_over_limit", "tusd-py / limit (aiobotocore multipart)"),
                            ("tusd_py_over_peer", "tusd-py / peer (@tus/server + s3-store)")):
            if name in ratios:
                per_run = ", ".join(f"{v:.2f}" for v in ratios[name]["per_run"])
                print(f"  {workload:<10} {label} = {ratios[name]['median']:.2f} (runs: {per_run})")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.s3",
        description="tusd-py's S3 store against moto, next to a direct aiobotocore multipart upload "
                    "(and @tus/server + @tus/s3-store with --peer).",
    )
    parser.add_argument("--runs", type=int, default=3, help="runs; medians are reported (default 3)")
    parser.add_argument("--size", type=parse_size, default=256 * MiB,
                        help="upload size (default 256MiB: moto runs near 100 MB/s)")
    parser.add_argument("--patch-size", type=parse_size, default=16 * MiB, help="PATCH size of the chunked workload")
    parser.add_argument("--workloads", default="single,chunked", help="comma-separated: single, chunked")
    parser.add_argument("--part-size", type=parse_size, default=8 * MiB,
                        help="S3 part size for every target (default 8MiB, tusd-py's default)")
    parser.add_argument("--concurrency", type=int, default=8,
                        help="UploadPart calls in flight for the limit and tusd-py (default 8, tusd-py's default)")
    parser.add_argument("--peer", action="store_true", help="also measure @tus/server + @tus/s3-store")
    parser.add_argument("--targets", default="limit,tusd-py", help="comma-separated subset of limit,tusd-py,peer")
    parser.add_argument("--server-cmd", default=DEFAULT_SERVER_CMD,
                        help="tusd-py command; {host} and {port} are filled in (default: %(default)s)")
    parser.add_argument("--peer-cmd", default=DEFAULT_PEER_CMD,
                        help="peer command; {host}, {port}, {endpoint}, {bucket}, {part_size} are filled in")
    parser.add_argument("--client-buffer", type=parse_size, default=16 * MiB, help="the client's send buffer")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds allowed per request")
    parser.add_argument("--tls", action="store_true",
                        help="reach moto through nginx terminating TLS (self-signed CA made here); traffic "
                             "counts stay on plain http (the counting proxy sits next to moto)")
    parser.add_argument("--checksum", default="crc32c", help="store.s3.checksum, also the limit's (default crc32c)")
    parser.add_argument("--concurrent", default="", help="UPLOADSxSIZE, e.g. 16x64MiB: also that many uploads at "
                        "once into tusd-py, each one PATCH (peak RSS)")
    parser.add_argument("--json", type=Path, help="write all per-run figures, medians and ratios here")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    if args.peer and "peer" not in targets:
        targets.append("peer")
    unknown = set(targets) - {"limit", "tusd-py", "peer"}
    if unknown:
        raise SystemExit(f"unknown targets: {', '.join(sorted(unknown))}")
    if "peer" in targets and not (PEERS_DIR / "node_modules" / "@tus" / "s3-store").is_dir():
        raise SystemExit(f"the peer is not installed: npm install --prefix {PEERS_DIR}")
    workloads = []
    for name in (w.strip() for w in args.workloads.split(",") if w.strip()):
        if name not in {"single", "chunked"}:
            raise SystemExit(f"unknown workload {name!r} (single, chunked)")
        workloads.append(Workload(size=args.size, patch_size=args.size if name == "single" else args.patch_size))
    work_dir = Path(tempfile.mkdtemp(prefix="tusd-py-s3-bench-"))
    options = Options(
        runs=args.runs, workloads=workloads, targets=targets, part_size=args.part_size,
        concurrency=args.concurrency, server_cmd=args.server_cmd, peer_cmd=args.peer_cmd,
        client_buffer=args.client_buffer, timeout=args.timeout, work_dir=work_dir, tls=args.tls,
        checksum=args.checksum,
        concurrent=Concurrent(int(args.concurrent.split("x")[0]), parse_size(args.concurrent.split("x", 1)[1]))
        if args.concurrent else None,
    )
    print(f"load average {load_average()}; part size {args.part_size}, concurrency {args.concurrency}")
    print(HEADER + f" {'moto CPU s/GiB':>14}")
    try:
        results = run_benchmark(options)
    except ServerFailed as error:
        print(f"\nserver failed: {error}", file=sys.stderr)
        return 2
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)
    summary = summarize(results, options)
    print_summary(summary, options)
    finish_report(results.meta, results.runs, summary, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
