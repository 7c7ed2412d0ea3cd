"""``vqa worker --gpus all|0,1,…`` and ``--processes N``: one worker process per GPU (or N on a CPU host), supervised.

The supervisor loads no model and imports no torch. It starts one ``vqa worker`` child per GPU,
each pinned with ``CUDA_VISIBLE_DEVICES`` to its GPU (which it then sees as ``cuda``), under its
own name (``<VQA_WORKER_NAME or host>-gpu<id>``, or ``-<n>`` with ``--processes``) and, when
``VQA_METRICS_PORT`` is set, on its own port (the base port + its position). Then:

* a child that exits without being asked to (a crash, the OOM killer, a CUDA error that took
  the process down) is started again after a backoff that doubles with each crash in a row
  (``VQA_RESTART_BACKOFF_S`` up to ``VQA_RESTART_BACKOFF_MAX_S``; a child that ran that long
  counts as healthy again); the other children are never touched. The crashed child's
  messages come back through the broker as any dead worker's do;
* SIGTERM or SIGINT is forwarded to every child as SIGTERM: each finishes or hands back its
  batch (warm shutdown, ``VQA_SHUTDOWN_GRACE_S``); children still running 10 s past the grace
  are killed. A second signal is forwarded too, and a worker exits at once on its second.
  The supervisor exits 0 when every child exited 0.

Children run in their own session, so a terminal's Ctrl-C reaches them once, through the
supervisor; on Linux they also get SIGTERM if the supervisor itself dies (PR_SET_PDEATHSIG).
"""

from __future__ import annotations

import ctypes
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from producer.settings import Settings

log = logging.getLogger(__name__)

_POLL_S = 0.2
_KILL_AFTER_GRACE_S = 10.0
_PR_SET_PDEATHSIG = 1


@dataclass(frozen=True)
class ChildSpec:
    """One supervised worker: its name and the environment it runs with on top of the supervisor's."""

    name: str
    env: Mapping[str, str]


def visible_gpus(environ: Mapping[str, str]) -> list[str]:
    """The GPUs this host lets us use: ``CUDA_VISIBLE_DEVICES`` when set, else every GPU ``nvidia-smi`` lists."""
    listed = environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        return [part.strip() for part in listed.split(",") if part.strip() and part.strip() != "-1"]
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return []
    try:
        out = subprocess.run([smi, "--query-gpu=index", "--format=csv,noheader"], capture_output=True, text=True, timeout=30, check=True)
    except (OSError, subprocess.SubprocessError):
        return []
    return [line.strip() for line in out.stdout.splitlines() if line.strip()]


def supervisor_name(settings: Settings) -> str:
    return f"{settings.worker_name or socket.gethostname()}-supervisor"


def plan_children(
    settings: Settings, *, gpus: str | None = None, processes: int | None = None, environ: Mapping[str, str] | None = None
) -> list[ChildSpec]:
    """The children for ``--gpus`` (``all`` or ids like ``0,1``) or ``--processes N``; ValueError on a request that cannot be met."""
    environ = os.environ if environ is None else environ
    if (gpus is None) == (processes is None):
        raise ValueError("give one of --gpus or --processes")
    base = settings.worker_name or socket.gethostname()
    if processes is not None:
        if processes < 1:
            raise ValueError("--processes must be at least 1")
        names = [(f"{base}-{n}", None) for n in range(processes)]
    else:
        assert gpus is not None
        ids = visible_gpus(environ) if gpus.strip() == "all" else [part.strip() for part in gpus.split(",")]
        if not ids or any(not gpu for gpu in ids):
            raise ValueError("no GPUs found (CUDA_VISIBLE_DEVICES is empty or nvidia-smi lists none)" if gpus.strip() == "all"
                             else f"--gpus {gpus!r}: give GPU ids separated by commas, or all")
        if len(set(ids)) != len(ids):
            raise ValueError(f"--gpus {gpus!r} names a GPU twice")
        names = [(f"{base}-gpu{gpu if gpu.isdigit() else n}", gpu) for n, gpu in enumerate(ids)]
    specs = []
    for position, (name, gpu) in enumerate(names):
        env = {"VQA_WORKER_NAME": name}
        if settings.metrics_port is not None:
            env["VQA_METRICS_PORT"] = str(settings.metrics_port + position)
        if gpu is not None:
            env["CUDA_VISIBLE_DEVICES"] = gpu
            if settings.device.startswith("cuda:"):
                env["VQA_DEVICE"] = "cuda"  # the one GPU the child sees is its cuda:0
        specs.append(ChildSpec(name=name, env=env))
    return specs


@dataclass
class _Child:
    spec: ChildSpec
    proc: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0
    crashes: int = 0  # in a row
    restart_at: float | None = None
    restarts: int = 0
    pids: list[int] = field(default_factory=list)


class Supervisor:
    """Runs and restarts the children of :func:`plan_children` until a signal stops them all (:meth:`run` blocks)."""

    def __init__(self, specs: Sequence[ChildSpec], *, settings: Settings, command: Sequence[str] | None = None) -> None:
        self.settings = settings
        self.command = list(command or [sys.executable, "-m", "producer.cli", "worker"])
        self.children = [_Child(spec) for spec in specs]
        self._signals = 0

    def run(self) -> int:
        """Start every child, keep them running, and on SIGTERM/SIGINT stop them all; the exit status."""
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        log.info("supervising %d workers: %s", len(self.children), ", ".join(child.spec.name for child in self.children))
        for child in self.children:
            self._start(child)
        forwarded = 0
        deadline: float | None = None
        while True:
            if self._signals > forwarded:
                forwarded = self._signals
                deadline = deadline or time.monotonic() + self.settings.shutdown_grace_s + _KILL_AFTER_GRACE_S
                self._send_all(signal.SIGTERM)
            if deadline is None:
                self._tend()
            elif all(child.proc is None or child.proc.poll() is not None for child in self.children):
                break
            elif time.monotonic() > deadline:
                log.warning("workers still running %.0f s past the shutdown grace: killing them", _KILL_AFTER_GRACE_S)
                self._send_all(signal.SIGKILL)
                for child in self.children:
                    if child.proc is not None:
                        child.proc.wait()
                break
            time.sleep(_POLL_S)
        codes = {child.spec.name: (child.proc.returncode if child.proc is not None else None) for child in self.children}
        log.info("all workers stopped: %s", ", ".join(f"{name} exit {code}" for name, code in codes.items()))
        return 0 if all(code == 0 for code in codes.values()) else 1

    def _on_signal(self, signum: int, _frame: Any) -> None:
        # Only counted here; the loop forwards it (a handler must not block on child processes).
        self._signals += 1

    def _tend(self) -> None:
        now = time.monotonic()
        for child in self.children:
            if child.restart_at is not None:
                if now >= child.restart_at:
                    child.restarts += 1
                    self._start(child)
                continue
            assert child.proc is not None
            code = child.proc.poll()
            if code is None:
                continue
            ran_s = now - child.started_at
            child.crashes = 1 if ran_s >= self.settings.restart_backoff_max_s else child.crashes + 1
            delay = min(self.settings.restart_backoff_s * 2 ** (child.crashes - 1), self.settings.restart_backoff_max_s)
            child.restart_at = now + delay
            log.error("worker %s (pid %d) exited with %s after %.1f s; restarting it in %.1f s (crash %d in a row)",
                      child.spec.name, child.proc.pid, code, ran_s, delay, child.crashes,
                      extra={"child": child.spec.name, "exit_code": code, "restart_in_s": delay})

    def _start(self, child: _Child) -> None:
        child.proc = subprocess.Popen(
            self.command,
            env={**os.environ, **child.spec.env},
            start_new_session=True,  # a terminal's Ctrl-C reaches the children through us only, once
            preexec_fn=_die_with_parent if sys.platform == "linux" else None,  # noqa: PLW1509 - no threads here
        )
        child.started_at = time.monotonic()
        child.restart_at = None
        child.pids.append(child.proc.pid)
        log.info("started worker %s (pid %d)", child.spec.name, child.proc.pid, extra={"child": child.spec.name, "pid": child.proc.pid})

    def _send_all(self, signum: int) -> None:
        for child in self.children:
            if child.proc is not None and child.proc.poll() is None:
                child.proc.send_signal(signum)
            child.restart_at = None  # one waiting for its restart stays down


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM (a warm shutdown) when the supervisor dies, even by SIGKILL."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        pass
