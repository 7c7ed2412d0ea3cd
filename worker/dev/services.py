"""Local stand-ins for production services, for the demo, the tests and the benchmarks.

Each is a real server in its own process (or thread, for the image server) on a free
loopback port, started by a context manager that always cleans up: ``redis-server``,
moto's S3 API server, a static HTTP image server, and ``vqa worker`` processes.
"""

from __future__ import annotations

import contextlib
import functools
import http.server
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import redis


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for_port(port: int, *, timeout: float = 20.0, proc: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening on {port}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listening on 127.0.0.1:{port} after {timeout} s")


@dataclass
class RedisServer:
    """A private ``redis-server`` with AOF persistence, restartable on the same port and data dir."""

    port: int = field(default_factory=free_port)
    data_dir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="vqa-redis-")))
    proc: subprocess.Popen[bytes] | None = None
    password: str | None = None  # --requirepass; the URL carries it
    extra_args: tuple[str, ...] = ()  # more redis-server options, e.g. --tls-port and its files

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server not found; install it (Debian: apt-get install redis-server)")
        self.proc = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.data_dir),
             "--appendonly", "yes", "--appendfsync", "always", "--save", "", "--protected-mode", "no",
             *(["--requirepass", self.password] if self.password else []), *self.extra_args],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        wait_for_port(self.port, proc=self.proc)
        client = redis.Redis.from_url(self.url)
        deadline = time.monotonic() + 20
        while True:  # the port opens before the AOF is loaded
            try:
                client.ping()
                break
            except redis.exceptions.BusyLoadingError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        client.close()
        return self

    def stop(self, *, kill: bool = False) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
            self.proc.wait(timeout=20)
        self.proc = None

    def restart(self, *, down_s: float = 0.0, kill: bool = True) -> None:
        self.stop(kill=kill)
        time.sleep(down_s)
        self.start()

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.data_dir, ignore_errors=True)


@dataclass
class S3Server:
    """moto's S3 API server over HTTP in its own process (MinIO is the production target)."""

    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None
    # Where the server's access log goes (one line per request: the benchmarks count S3 requests per job).
    access_log: Path | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> S3Server:
        log = subprocess.DEVNULL if self.access_log is None else self.access_log.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=subprocess.DEVNULL, stderr=log,
        )
        wait_for_port(self.port, proc=self.proc)
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=20)
        self.proc = None


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # connections kept alive, as image CDNs and S3 keep them (worker/fetch/kept.py)

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - stdlib signature
        pass


@contextlib.contextmanager
def image_server(directory: Path, *, delay_s: float = 0.0, requests: list[str] | None = None) -> Iterator[str]:
    """Serve ``directory`` over loopback HTTP; yields the base URL. ``delay_s`` adds latency per request; ``requests`` gets each GET's path."""

    open_connections: set[socket.socket] = set()  # the ones a handler still serves (set.add/discard are atomic)

    class Handler(_QuietHandler):
        def setup(self) -> None:
            super().setup()
            open_connections.add(self.connection)

        def finish(self) -> None:
            open_connections.discard(self.connection)
            super().finish()

        def do_GET(self) -> None:
            if requests is not None:
                requests.append(self.path)  # list.append is atomic: handler threads may race
            if delay_s:
                time.sleep(delay_s)
            super().do_GET()

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(directory)))
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        # As a host going down does: the connections its clients keep end too, not only the listening socket.
        for connection in list(open_connections):
            with contextlib.suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)


# What a worker says once it consumes: the line it prints, its log line in text or JSON format.
READY_LINE = re.compile(r"worker (\S+) ready\b")


@dataclass
class WorkerProcess:
    """``vqa worker`` as a separate OS process, exactly as an operator runs it (``args``: e.g. ``--processes 2``)."""

    env: Mapping[str, str]
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None
    args: tuple[str, ...] = ()
    ready_workers: int = 1  # start() returns once this many workers said they are ready

    def start(self, *, ready_timeout: float = 120.0) -> WorkerProcess:
        env = {**os.environ, **self.env, "PYTHONUNBUFFERED": "1"}
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen([sys.executable, "-m", "producer.cli", "worker", *self.args], env=env, stdout=self._log,
                                     stderr=subprocess.STDOUT)
        deadline = time.monotonic() + ready_timeout
        while time.monotonic() < deadline:
            if len(self.ready_names()) >= self.ready_workers:
                return self
            if self.proc.poll() is not None:
                raise RuntimeError(f"worker exited with {self.proc.returncode}:\n{self._log_text()[-4000:]}")
            time.sleep(0.1)
        raise TimeoutError(f"worker not ready after {ready_timeout} s:\n{self._log_text()[-4000:]}")

    def _log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def ready_names(self) -> set[str]:
        """Names of the workers that said they are ready, so far (a supervisor's children each say it)."""
        return set(READY_LINE.findall(self._log_text()))

    @property
    def log(self) -> str:
        return self._log_text()

    def signal(self, signum: int) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signum)

    def wait(self, timeout: float) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout=timeout)

    def stop(self, *, timeout: float = 60.0) -> None:
        if self.proc is None:
            return
        terminate(self.proc, timeout=timeout)
        self._log.close()
        self.proc = None


@dataclass
class ApiProcess:
    """``vqa api`` as a separate OS process on a free loopback port; ``start`` returns once /healthz answers."""

    env: Mapping[str, str]
    log_path: Path
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, *, ready_timeout: float = 60.0) -> ApiProcess:
        import urllib.request

        env = {**os.environ, **self.env, "PYTHONUNBUFFERED": "1"}
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen([sys.executable, "-m", "producer.cli", "api", "--host", "127.0.0.1", "--port", str(self.port)],
                                     env=env, stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + ready_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"vqa api exited with {self.proc.returncode}:\n{self.log[-4000:]}")
            try:
                with urllib.request.urlopen(f"{self.url}/healthz", timeout=2) as response:
                    if response.status == 200:
                        return self
            except OSError:
                time.sleep(0.1)
        raise TimeoutError(f"vqa api not ready after {ready_timeout} s:\n{self.log[-4000:]}")

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self, *, timeout: float = 20.0) -> None:
        if self.proc is None:
            return
        terminate(self.proc, timeout=timeout)
        self._log.close()
        self.proc = None


def terminate(proc: subprocess.Popen[bytes], *, timeout: float) -> None:
    """SIGTERM, then SIGKILL after ``timeout`` seconds."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
