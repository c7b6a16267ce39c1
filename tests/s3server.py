"""A real S3-compatible server for the tests: moto's standalone server in a process of its own on
127.0.0.1, behind a TCP relay the test can cut and restore (the server keeps its objects meanwhile, as
a real S3 endpoint that becomes unreachable would). Clients find it the standard way:
AWS_ENDPOINT_URL and the AWS_* credentials in the environment (fake ones; moto accepts any)."""

from __future__ import annotations

import contextlib
import os
import re
import selectors
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

_CONDITIONS = re.compile(rb"(?im)^if-(?:none-)?match:[^\r\n]*\r\n")

ENV = {
    "AWS_ACCESS_KEY_ID": "kto-ray-test",
    "AWS_SECRET_ACCESS_KEY": "kto-ray-test-secret",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_for_port(port: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return
        time.sleep(0.1)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port}")


@dataclass
class Relay:
    """Forwards 127.0.0.1:`port` to the server; `cut()` closes the listener and every open connection
    (clients see refused connections), `restore()` listens again on the same port."""

    target: int
    port: int = field(default_factory=free_port)
    _listener: socket.socket | None = None
    # A request holding these bytes (e.g. a key in its request line) is held, never forwarded, until
    # `cut()`: the test decides when the storage goes, while that client is in the middle of its write.
    hold_on: bytes | None = None
    holding: threading.Event = field(default_factory=threading.Event)
    # Drop the conditional headers (If-Match, If-None-Match) from requests: a server that ignores them.
    ignore_conditions: bool = False
    _cut: threading.Event = field(default_factory=threading.Event)
    _open: set[socket.socket] = field(default_factory=set)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def restore(self) -> None:
        self._cut.clear()
        self.holding.clear()
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def cut(self) -> None:
        self._cut.set()
        listener, self._listener = self._listener, None
        if listener is not None:
            listener.close()
        with self._lock:
            for conn in self._open:
                with contextlib.suppress(OSError):
                    conn.shutdown(socket.SHUT_RDWR)
                    conn.close()
            self._open.clear()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # cut
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target))
            except OSError:
                client.close()
                continue
            with self._lock:
                self._open.update((client, upstream))
            threading.Thread(target=self._pipe, args=(client, upstream), daemon=True).start()

    def _pipe(self, a: socket.socket, b: socket.socket) -> None:
        selector = selectors.DefaultSelector()
        selector.register(a, selectors.EVENT_READ, b)
        selector.register(b, selectors.EVENT_READ, a)
        try:
            while True:
                for key, _ in selector.select(timeout=1.0):
                    data = key.fileobj.recv(65536)
                    if not data:
                        return
                    if self.hold_on is not None and key.fileobj is a and self.hold_on in data:
                        self.holding.set()
                        self._cut.wait()  # the request never reaches the server
                        return
                    if self.ignore_conditions and key.fileobj is a:
                        data = _CONDITIONS.sub(b"", data)  # moto checks no signatures
                    key.data.sendall(data)
        except OSError:
            return
        finally:
            selector.close()
            for sock in (a, b):
                with contextlib.suppress(OSError):
                    sock.close()
            with self._lock:
                self._open.discard(a)
                self._open.discard(b)


@dataclass
class S3Server:
    relay: Relay
    process: subprocess.Popen

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.relay.port}"

    def environment(self) -> dict[str, str]:
        return ENV | {"AWS_ENDPOINT_URL": self.endpoint}

    def create_bucket(self, name: str) -> None:
        import pyarrow.fs as pafs

        fs = pafs.S3FileSystem(
            endpoint_override=self.endpoint,
            scheme="http",
            access_key=ENV["AWS_ACCESS_KEY_ID"],
            secret_key=ENV["AWS_SECRET_ACCESS_KEY"],
            region=ENV["AWS_DEFAULT_REGION"],
            allow_bucket_creation=True,
        )
        fs.create_dir(name)


@contextlib.contextmanager
def s3_server() -> Iterator[S3Server]:
    """moto's server on a free port behind a relay; stopped by its pid at the end."""
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=dict(os.environ),
    )
    try:
        _wait_for_port(port)
        relay = Relay(target=port)
        relay.restore()
        yield S3Server(relay, process)
    finally:
        process.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=10)
        if process.poll() is None:
            process.kill()
