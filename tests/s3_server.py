"""A real S3 server on loopback (moto) and a fault-injecting HTTP proxy in front of it.

Used by the object-storage tests and ``scripts/bench_s3.py``. Nothing here leaves
127.0.0.1. The proxy records every request it forwards (method, path, status) in order, so
tests observe what the client did at the server side, and it can inject faults per
request: drop the connection in the middle of a response body, answer 500 or 503
SlowDown, or wait before the first byte (latency).
"""

from __future__ import annotations

import http.client
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

__all__ = ["S3Server", "FaultProxy", "Request", "s3_options", "spawn_proxy"]

_HOP_HEADERS = {"connection", "keep-alive", "transfer-encoding", "proxy-connection", "te",
                "upgrade", "trailer"}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_for_port(port: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port} after {timeout} s")


class S3Server:
    """moto's S3 server on 127.0.0.1 at a free port (start/stop).

    Args:
        process: run it in a child process (its own interpreter and GIL: use for
            benchmarks) instead of a thread of this process (fast start: use for tests).
        env: for a child process, variables set on top of this process's (moto's
            settings, such as ``INITIAL_NO_AUTH_ACTION_COUNT``, which turns on IAM).
    """

    def __init__(self, *, process: bool = False, env: dict[str, str] | None = None) -> None:
        self._process_mode = process
        self._env = env  # environment variables for the child process (moto's settings)
        self._child: subprocess.Popen[bytes] | None = None
        self._server: Any = None
        self.endpoint = ""

    def start(self) -> S3Server:
        if self._process_mode:
            port = _free_port()
            self._child = subprocess.Popen(
                [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                env={**os.environ, **(self._env or {})},
            )
            _wait_for_port(port)
            self.endpoint = f"http://127.0.0.1:{port}"
            return self
        from moto.server import ThreadedMotoServer

        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self._server.start()
        host, port = self._server.get_host_and_port()
        self.endpoint = f"http://{host}:{port}"
        return self

    def stop(self) -> None:
        if self._child is not None:
            self._child.terminate()
            self._child.wait(timeout=10)
            self._child = None
        elif self._server is not None:
            self._server.stop()

    def reset(self) -> None:
        """Forget every bucket and object (moto's reset API)."""
        import urllib.request

        urllib.request.urlopen(urllib.request.Request(f"{self.endpoint}/moto-api/reset", method="POST")).read()


def s3_options(endpoint: str, **extra: Any) -> dict[str, Any]:
    """storage_options for s3fs pointing at ``endpoint``; extra keys are merged in."""
    options: dict[str, Any] = {"client_kwargs": {"endpoint_url": endpoint}}
    options.update(extra)
    return options


def iam_user_key(endpoint: str, user: str, statements: list[dict[str, Any]], bucket: str = "data") -> dict[str, str]:
    """On a moto server started with ``INITIAL_NO_AUTH_ACTION_COUNT=4`` (its first four
    requests need no credentials): an IAM user allowed ``statements``, and ``bucket``;
    returns the user's access key (``AccessKeyId``, ``SecretAccessKey``). From then on moto
    holds every request to its signer's policy, as S3 does."""
    import json

    import boto3

    boot = dict(endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="boot",
                aws_secret_access_key="boot-secret")
    iam = boto3.client("iam", **boot)
    iam.create_user(UserName=user)
    iam.put_user_policy(UserName=user, PolicyName="policy", PolicyDocument=json.dumps(
        {"Version": "2012-10-17", "Statement": statements}))
    key = iam.create_access_key(UserName=user)["AccessKey"]
    boto3.client("s3", **boot).create_bucket(Bucket=bucket)  # the 4th request without auth
    return key


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    status: int
    fault: str | None = None


# fault(method, path, n) -> None, "drop" (cut the body half-way), "500", "503", or "reset"
# (close before answering); n counts requests with the same method and path, from 1.
FaultFn = Callable[[str, str, int], str | None]


@dataclass
class FaultProxy:
    """A threaded HTTP/1.1 proxy on 127.0.0.1 forwarding to ``upstream`` (an endpoint URL).

    Attributes:
        fault: decides a fault per request (see ``FaultFn``); None forwards everything.
        latency: seconds to wait before answering each request (time to first byte).
        log: every request forwarded, in order.
    """

    upstream: str
    fault: FaultFn | None = None
    latency: float = 0.0
    port: int = 0
    log: list[Request] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._seen: dict[tuple[str, str], int] = {}
        host_port = self.upstream.split("://", 1)[1].rstrip("/")
        host, port = host_port.rsplit(":", 1)
        self._upstream = (host, int(port))
        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), self._handler_class())
        self._server.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def start(self) -> FaultProxy:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def requests(self, method: str | None = None) -> list[Request]:
        with self._lock:
            return [r for r in self.log if method is None or r.method == method]

    def _count(self, method: str, path: str) -> int:
        with self._lock:
            n = self._seen.get((method, path), 0) + 1
            self._seen[(method, path)] = n
            return n

    def _record(self, request: Request) -> None:
        with self._lock:
            self.log.append(request)

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:  # quiet
                pass

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    chunks = []
                    while True:
                        size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                        if size == 0:
                            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                                pass
                            break
                        chunks.append(self.rfile.read(size))
                        self.rfile.readline()
                    return b"".join(chunks)
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _handle(self) -> None:
                body = self._body()
                path = self.path.split("?", 1)[0]
                n = proxy._count(self.command, path)
                fault = proxy.fault(self.command, path, n) if proxy.fault else None
                if proxy.latency:
                    time.sleep(proxy.latency)
                if fault == "reset":
                    proxy._record(Request(self.command, path, 0, fault))
                    self._abort()
                    return
                if fault in ("500", "503"):
                    proxy._record(Request(self.command, path, int(fault), fault))
                    code = "SlowDown" if fault == "503" else "InternalError"
                    message = b"<Error><Code>" + code.encode() + b"</Code><Message>injected</Message></Error>"
                    self.send_response(int(fault))
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(message)))
                    self.end_headers()
                    self.wfile.write(message)
                    return
                headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_HEADERS}
                if "Transfer-Encoding" in self.headers:
                    headers["Content-Length"] = str(len(body))
                conn = http.client.HTTPConnection(*proxy._upstream, timeout=60)
                try:
                    conn.request(self.command, self.path, body=body, headers=headers)
                    resp = conn.getresponse()
                    data = resp.read()
                    out_headers = [(k, v) for k, v in resp.getheaders() if k.lower() not in _HOP_HEADERS]
                    status = resp.status
                finally:
                    conn.close()
                proxy._record(Request(self.command, path, status, fault))
                self.send_response(status)
                for k, v in out_headers:
                    if k.lower() != "content-length" or self.command == "HEAD":
                        self.send_header(k, v)
                if self.command != "HEAD":
                    self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command == "HEAD":
                    return
                if fault == "drop" and len(data) > 1:
                    self.wfile.write(data[: len(data) // 2])
                    self.wfile.flush()
                    self._abort()
                    return
                self.wfile.write(data)

            def _abort(self) -> None:
                self.close_connection = True
                try:
                    self.connection.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _handle

        return Handler


def spawn_proxy(upstream: str, *, latency: float = 0.0) -> tuple[str, subprocess.Popen[bytes]]:
    """A latency-only FaultProxy in a child process (its own GIL); returns (endpoint, child).
    The caller terminates the child."""
    port = _free_port()
    child = subprocess.Popen(
        [sys.executable, __file__, upstream, str(port), str(latency)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    _wait_for_port(port)
    return f"http://127.0.0.1:{port}", child


def _serve_forever(upstream: str, port: int, latency: float) -> None:
    proxy = FaultProxy(upstream, latency=latency, port=port)
    proxy._server.serve_forever()


if __name__ == "__main__":
    _serve_forever(sys.argv[1], int(sys.argv[2]), float(sys.argv[3]))
