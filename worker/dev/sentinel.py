"""A Sentinel-managed Redis for the failover tests and the failover benchmark: a master, a replica, three sentinels.

Every part is a real process on a free loopback port. Sentinels run as ``redis-sentinel`` where it
is installed, else as ``redis-server --sentinel`` (the same binary; ``make services-check`` says
which). Down-after and failover timeouts are short, so a killed master is replaced in a few seconds.

``replica_link`` lets the replica reach its master through something in between (the failover
benchmark's stallable proxy): it gets the master's port and returns the port the replica dials.
The sentinels always talk to both servers directly. They also "fix" a replica that follows another
address than the master's (``+fix-slave-config``), but only a failover-timeout after they found it:
a group with a ``replica_link`` is given a long failover timeout, so the link stays in place for the
run (one failover still takes seconds: the timeout bounds retries, not the first attempt).
"""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import redis

from worker.dev.services import RedisServer, free_port, wait_for_port

MASTER_NAME = "vqa-master"
QUORUM = 2


def sentinel_command(config: Path) -> list[str]:
    """How a sentinel is started here: ``redis-sentinel CONF``, else ``redis-server CONF --sentinel``."""
    binary = shutil.which("redis-sentinel")
    if binary:
        return [binary, str(config)]
    server = shutil.which("redis-server")
    if server is None:
        raise RuntimeError("neither redis-sentinel nor redis-server found; install redis-server (Debian: apt-get install redis-server redis-sentinel)")
    return [server, str(config), "--sentinel"]


@dataclass
class SentinelGroup:
    """A master, one replica of it and three sentinels watching it; :meth:`stop` ends them all."""

    data_dir: Path
    master_name: str = MASTER_NAME
    down_after_ms: int = 500
    failover_timeout_ms: int = 3000
    replica_link: Callable[[int], int] | None = None
    master: RedisServer | None = None
    replica: RedisServer | None = None
    sentinels: list[subprocess.Popen[bytes]] = field(default_factory=list)
    sentinel_ports: list[int] = field(default_factory=list)

    @property
    def url(self) -> str:
        """The ``redis+sentinel://`` URL clients and workers are given."""
        return "redis+sentinel://" + ",".join(f"127.0.0.1:{port}" for port in self.sentinel_ports) + f"/{self.master_name}/0"

    def start(self, *, sync_timeout_s: float = 20.0) -> SentinelGroup:
        for name in ("master", "replica"):
            (self.data_dir / name).mkdir(parents=True, exist_ok=True)
        self.master = RedisServer(data_dir=self.data_dir / "master").start()
        link = self.replica_link(self.master.port) if self.replica_link else self.master.port
        self.replica = RedisServer(data_dir=self.data_dir / "replica", extra_args=("--replicaof", "127.0.0.1", str(link))).start()
        for _ in range(3):
            self._start_sentinel()
        self.wait(lambda: self.role(self.replica) == "slave" and self._link_up(), sync_timeout_s, "replica never synced")
        # Sentinels learn of the replica (and of each other) from the master within a few seconds:
        # a kill before that leaves nobody to promote.
        self.wait(self._sentinels_see_replica, sync_timeout_s, "sentinels never saw the replica")
        return self

    def _start_sentinel(self) -> None:
        port = free_port()
        config = self.data_dir / f"sentinel-{port}.conf"  # sentinels rewrite their config: a file of their own
        assert self.master is not None
        config.write_text(
            f"port {port}\nbind 127.0.0.1\ndir {self.data_dir}\n"
            f"sentinel monitor {self.master_name} 127.0.0.1 {self.master.port} {QUORUM}\n"
            f"sentinel down-after-milliseconds {self.master_name} {self.down_after_ms}\n"
            f"sentinel failover-timeout {self.master_name} {self.failover_timeout_ms}\n"
        )
        proc = subprocess.Popen(sentinel_command(config), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.sentinels.append(proc)
        wait_for_port(port, proc=proc)
        self.sentinel_ports.append(port)

    def _link_up(self) -> bool:
        return self.master_link_up(self.replica)

    def master_link_up(self, server: RedisServer | None) -> bool:
        """Whether ``server`` is a replica in sync with its master."""
        try:
            return self._info(server).get("master_link_status") == "up"
        except redis.RedisError:
            return False

    def _sentinels_see_replica(self) -> bool:
        for port in self.sentinel_ports:
            client = redis.Redis(port=port, socket_timeout=2)
            try:
                if not client.execute_command("SENTINEL", "REPLICAS", self.master_name):
                    return False
            finally:
                client.close()
        return True

    @staticmethod
    def _info(server: RedisServer | None) -> dict[str, object]:
        assert server is not None
        client = redis.Redis(port=server.port, socket_timeout=2)
        try:
            return dict(client.info("replication"))
        finally:
            client.close()

    def role(self, server: RedisServer | None) -> str | None:
        """``master`` or ``slave`` as the server says; None when it does not answer."""
        try:
            return str(self._info(server)["role"])
        except redis.RedisError:
            return None

    def kill_master(self) -> None:
        """SIGKILL: no handover; the sentinels must notice and promote the replica."""
        assert self.master is not None
        self.master.stop(kill=True)

    def replica_follows(self) -> int | None:
        """The port the replica replicates from (the ``replica_link``'s while the sentinels left it alone)."""
        try:
            port = self._info(self.replica).get("master_port")
        except redis.RedisError:
            return None
        return int(port) if port is not None else None  # type: ignore[call-overload]

    def promoted(self) -> bool:
        return self.role(self.replica) == "master"

    @staticmethod
    def wait(condition: Callable[[], bool], timeout_s: float, what: str) -> float:
        """Poll ``condition`` every 20 ms; return the time.monotonic() it held, or raise TimeoutError."""
        deadline = time.monotonic() + timeout_s
        while not condition():
            if time.monotonic() > deadline:
                raise TimeoutError(f"{what} (after {timeout_s:.0f} s)")
            time.sleep(0.02)
        return time.monotonic()

    def stop(self) -> None:
        for proc in self.sentinels:
            if proc.poll() is None:
                proc.terminate()
                proc.wait(timeout=10)
        self.sentinels.clear()
        for server in (self.replica, self.master):
            if server is not None:
                server.stop(kill=True)
