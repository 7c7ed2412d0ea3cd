"""``VQA_PREPROCESS_PROCESSES``: decode and image preprocessing in processes of their own.

On the fetch threads, decoding and the LLaVA-NeXT image processor share the worker's GIL with
the thread that drives ``generate``, whose Python loop holds it between kernels. With a
stand-in model thread that holds the GIL that way, the worker's path on two fetch threads
sustained 2.12 images/s (phone photos and full-HD frames) and through two of these processes
4.44, on the same two cores, with less stall of the model thread per image
(docs/benchmarks/preprocess/process-pool/). So a GPU host can move that work out of the process: each fetch
thread still downloads the image (network waits release the GIL), then hands its bytes to one
of these processes, which decodes them under the worker's :class:`FetchPolicy` and builds the
image's inputs (:class:`worker.imageprep.ImageInputs`) as ``VQAModel.prepare_image`` would. The
question's part (a few tokens) stays on the fetch thread.

What comes back: the inputs, and the CPU seconds the process spent decoding and preprocessing,
which the worker adds to its own account (worker/cputime.py), so ``vqa_decode_cpu_seconds_total``
and ``vqa_preprocess_cpu_seconds_total`` still count them. An image the decoder rejects raises
its own error, code kept, across the process boundary. A process that dies (killed, out of
memory) takes with it the work it held: those jobs fail with a transient error, so they are
retried, and the pool is started again for the next image.

Processes are started with ``spawn`` (the worker has threads: ``fork`` could copy a held lock),
each with one torch thread, before the worker takes its first job. They ignore SIGINT and SIGTERM
(the worker's shutdown closes them) and end within a second of a worker that was killed outright.
"""

from __future__ import annotations

import dataclasses
import logging
import multiprocessing
import os
import signal
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from multiprocessing import shared_memory
from typing import Any

import numpy as np

from producer.errors import TransientError
from worker.fetch.images import FetchPolicy, decode_image, install_pillow_warning_filter
from worker.imageprep import ImageInputs, ImagePrep

log = logging.getLogger(__name__)


class PreprocessPool:
    """``processes`` processes that turn fetched bytes into an image's inputs: ``pool.prepare_image(data, image_grid)``."""

    def __init__(self, prep: ImagePrep, policy: FetchPolicy, *, processes: int) -> None:
        if processes < 1:
            raise ValueError(f"processes must be at least 1, not {processes}")
        self.processes = processes
        # Kept connections hold sockets and threads: a process needs only the decoding rules.
        self._initargs = (prep, dataclasses.replace(policy, connections=None))
        self._lock = threading.Lock()
        self._executor = self._start()

    def _start(self) -> ProcessPoolExecutor:
        return ProcessPoolExecutor(self.processes, mp_context=multiprocessing.get_context("spawn"),
                                   initializer=_init_process, initargs=self._initargs)

    def warm(self) -> None:
        """Start every process now (each imports transformers, seconds), not under the first jobs."""
        futures = [self._executor.submit(_ready, 0.2) for _ in range(self.processes)]
        for future in futures:
            future.result()

    def prepare_image(self, data: bytes, *, image_grid: str | None) -> tuple[ImageInputs, float, float]:
        """Decode ``data`` and prepare the image for ``image_grid``; with the CPU seconds of each (decode, preprocess)."""
        executor = self._executor
        try:
            wire, decode_s, preprocess_s = executor.submit(_decode_and_prepare, data, image_grid).result()
        except BrokenProcessPool as exc:
            self._restart(executor)
            raise TransientError("the image's preprocessing process stopped before it finished; the job will be retried",
                                 code="preprocess_process_lost") from exc
        return _from_wire(wire), decode_s, preprocess_s

    def _restart(self, broken: ProcessPoolExecutor) -> None:
        with self._lock:
            if self._executor is not broken:
                return  # another fetch thread already started the new pool
            log.warning("a preprocessing process died; starting %d new ones", self.processes)
            self._executor = self._start()
        broken.shutdown(wait=False, cancel_futures=True)

    def close(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)


# In each process: what _init_process was given.
_PREP: ImagePrep | None = None
_POLICY: FetchPolicy | None = None


def _init_process(prep: ImagePrep, policy: FetchPolicy) -> None:
    global _PREP, _POLICY
    import torch

    # Ctrl-C reaches the whole process group and `kill -TERM` may too: the worker's warm shutdown
    # decides when these processes stop (close()), not a signal meant for it.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    # A worker killed outright (SIGKILL, the OOM killer) cannot close them, and they would wait
    # for work for ever: each checks for its parent once a second and ends with it.
    threading.Thread(target=_end_with, args=(os.getppid(),), name="vqa-preprocess-parent-watch", daemon=True).start()

    # The pool is the parallelism: one thread per process, as each fetch thread has.
    torch.set_num_threads(1)
    install_pillow_warning_filter()
    _PREP, _POLICY = prep, policy


def _end_with(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(1.0)
    os._exit(0)


def _ready(seconds: float) -> bool:
    time.sleep(seconds)  # holds this process, so that each warm-up call starts another
    return True


def _decode_and_prepare(data: bytes, image_grid: str | None) -> tuple[dict[str, Any], float, float]:
    assert _PREP is not None and _POLICY is not None, "process not initialised"
    start = time.thread_time()
    image = decode_image(data, _POLICY, image_grid=image_grid)
    decoded = time.thread_time()
    inputs = _PREP.prepare_image(image, image_grid=image_grid, source=data)
    return _to_wire(inputs), decoded - start, time.thread_time() - decoded


# The tiles (6.8 MB for the 7B's five) cross in a shared-memory block, the pipe carries its name.
# Through the pipe itself they came in 64 KB reads, each waiting for the GIL that the model
# thread holds: 2.06 images/s with two processes against 5.06 for the same work returning
# nothing (docs/benchmarks/preprocess/process-pool/pipe-transfer/). Torch's own tensor sharing would keep a
# file descriptor open for as long as each tensor lives.
def _to_wire(inputs: ImageInputs) -> dict[str, Any]:
    fields = {field.name: getattr(inputs, field.name) for field in dataclasses.fields(inputs)}
    pixels = inputs.pixel_values.numpy()
    block = shared_memory.SharedMemory(create=True, size=max(pixels.nbytes, 1))
    try:
        view = np.ndarray(pixels.shape, pixels.dtype, buffer=block.buf)
        view[...] = pixels
        del view  # the block cannot close while a view of it exists
    finally:
        block.close()
    return {**fields, "pixel_values": (block.name, pixels.shape, pixels.dtype.str), "image_size": inputs.image_size.numpy()}


def _from_wire(wire: dict[str, Any]) -> ImageInputs:
    import torch

    name, shape, dtype = wire["pixel_values"]
    block = shared_memory.SharedMemory(name=name)
    try:
        view = np.ndarray(shape, np.dtype(dtype), buffer=block.buf)
        pixels = torch.from_numpy(view.copy())
        del view
    finally:
        block.close()
        block.unlink()
    return ImageInputs(**{**wire, "pixel_values": pixels, "image_size": torch.from_numpy(wire["image_size"])})
