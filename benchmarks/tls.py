"""A TLS endpoint for the S3 benchmark, as production runs: Debian's nginx terminates
TLS in front of moto, with a certificate from a CA the benchmark makes with openssl.

``tls_terminator(work_dir, upstream_port)`` returns the nginx ``ServerProcess`` (not
started) and the CA bundle to trust (``store.s3.ca_bundle`` / AWS_CA_BUNDLE). nginx
keeps its connections to the clients alive and streams request bodies straight
through (no buffering on disk), so it adds TLS and little else.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from benchmarks.common import ServerProcess, free_port

_CONFIG = """\
daemon off;
master_process off;
worker_processes 1;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {prefix}/client_body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;
    upstream moto {{ server {host}:{upstream_port}; }}
    server {{
        listen {host}:{port} ssl;
        ssl_certificate {prefix}/server.pem;
        ssl_certificate_key {prefix}/server.key;
        ssl_protocols TLSv1.2 TLSv1.3;
        keepalive_requests 100000;
        client_max_body_size 0;
        proxy_request_buffering off;
        proxy_buffering off;
        location / {{
            proxy_pass http://moto;
            proxy_set_header Host $http_host;
            proxy_read_timeout 600s;
            proxy_send_timeout 600s;
        }}
    }}
}}
"""


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def make_certificates(directory: Path, host: str) -> Path:
    """A self-signed CA and a server certificate for ``host`` (an IP address) signed
    by it, in ``directory``; returns the CA's PEM file."""
    directory.mkdir(parents=True, exist_ok=True)
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=tusd-py bench CA",
             "-keyout", "ca.key", "-out", "ca.pem", cwd=directory)
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={host}",
             "-keyout", "server.key", "-out", "server.csr", cwd=directory)
    (directory / "san.ext").write_text(f"subjectAltName=IP:{host}\n")
    _openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
             "-days", "2", "-extfile", "san.ext", "-out", "server.pem", cwd=directory)
    return directory / "ca.pem"


def tls_terminator(work_dir: Path, host: str, upstream_port: int) -> tuple[ServerProcess, Path]:
    """nginx terminating TLS on a free port of ``host`` in front of
    ``host:upstream_port``, and the CA bundle that trusts it."""
    nginx = shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/usr/local/sbin")
    if nginx is None:
        raise RuntimeError("nginx is not installed (Debian: apt-get install -y nginx)")
    prefix = (work_dir / "nginx-tls").resolve()
    ca = make_certificates(prefix, host)
    port = free_port(host)
    (prefix / "nginx.conf").write_text(_CONFIG.format(prefix=prefix, host=host, port=port, upstream_port=upstream_port))
    command = [nginx, "-p", str(prefix), "-c", str(prefix / "nginx.conf"), "-e", str(prefix / "error.log")]
    return ServerProcess("nginx-tls", command, host, port, work_dir / "nginx-tls.log"), ca
