"""Host inputs through pinned, overlapped staging: inference on a host batch of the cupy backend.

A host batch (N,28,28) uint8 is cut into chunks of ``chunk`` images (``plan_chunks``). Each chunk is copied by the
host into one of two pinned (page-locked) buffers, then asynchronously to one of two device buffers on a copy
stream, while the previous chunk computes on the runtime's stream; an event orders each chunk's compute after its
copy, and another keeps a device buffer from being overwritten before the compute that reads it has run. The
results of every chunk land in one device array; one copy back and one synchronisation end the call. The pinned and
device buffers and the result are allocated at the first call at a size (``Stager`` is kept per backend) and reused.

Why: a pageable host-to-device copy runs at about half the bus bandwidth and serialises with compute (the H200
review: 465 µs of copy against 488 µs of kernel for 10,000 images).

On the CPU harness (HostRuntime) the same loop runs with plain arrays and no streams: the chunking, the offsets
and the one copy back are what the tests check there.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

#: images per chunk (1.6 MB of uint8): large enough that a copy is bandwidth-bound and a launch fills the GPU
#: (v3 packs 4 images a block past 4 x SMs: 512 blocks), small enough that the host's copy of the next chunk into
#: pinned memory overlaps this chunk's transfer and compute (estimate, not measured: at 10,000 images the host
#: memcpy, ~0.4-0.8 ms at 10-20 GB/s, bounds the call; the H200's pageable copy alone took 465 us)
CHUNK = 2048
SLOTS = 2


def plan_chunks(n: int, chunk: int = CHUNK) -> list[tuple[int, int]]:
    """(start, count) of each chunk of a batch of ``n`` images: full chunks then the remainder."""
    if n < 1 or chunk < 1:
        raise ValueError(f"plan_chunks: n and chunk must be >= 1 (got {n}, {chunk})")
    return [(s, min(chunk, n - s)) for s in range(0, n, chunk)]


class Stager:
    """Pinned, double-buffered host-to-device staging of uint8 image batches on one runtime (see the module)."""

    def __init__(self, rt: Any, chunk: int = CHUNK, slots: int = SLOTS) -> None:
        self.rt = rt
        self.chunk, self.slots = int(chunk), int(slots)
        self.gpu = bool(getattr(rt, "is_gpu", False))
        self._host: list[np.ndarray] = []
        self._dev: list[Any] = []
        self._outs: dict[tuple[int, int], Any] = {}
        if self.gpu:
            cp = rt.cp
            self.copy_stream = cp.cuda.Stream(non_blocking=True)
            self.copied = [cp.cuda.Event(disable_timing=True) for _ in range(self.slots)]
            self.consumed = [cp.cuda.Event(disable_timing=True) for _ in range(self.slots)]

    def _buffers(self, rows: int, chunk: int) -> None:
        """The pinned and device slot buffers, of ``min(chunk, rows)`` images (grown, never shrunk)."""
        size = min(chunk, rows)
        if self._host and self._host[0].shape[0] >= size:
            return
        shape = (size, 28, 28)
        if self.gpu:
            import cupyx

            self._host = [cupyx.empty_pinned(shape, np.uint8) for _ in range(self.slots)]
        else:
            self._host = [np.empty(shape, np.uint8) for _ in range(self.slots)]
        self._dev = [self.rt.empty(shape, np.uint8) for _ in range(self.slots)]

    def output(self, n: int, width: int) -> Any:
        """The device result (n, width) float32, allocated at the first call at a size."""
        out = self._outs.get((n, width))
        if out is None:
            out = self._outs[(n, width)] = self.rt.empty((n, width))
        return out

    def run(self, images: np.ndarray, out: Any, compute: Callable[[Any, Any], None],
            chunk: int | None = None) -> np.ndarray:
        """For each chunk (start, count): stage images[start:start+count] on the device and call
        ``compute(device_images, out[start:start+count])`` (launches on the runtime's stream); then copy ``out``
        back (one copy, one synchronisation) and return it. ``chunk``: images per chunk (default ``self.chunk``)."""
        n = images.shape[0]
        chunk = int(chunk or self.chunk)
        self._buffers(n, chunk)
        rt = self.rt
        for i, (s, c) in enumerate(plan_chunks(n, chunk)):
            k = i % self.slots
            host, dev = self._host[k][:c], self._dev[k][:c]
            if self.gpu:
                if i >= self.slots:
                    self.copied[k].synchronize()  # the pinned slot's previous copy has left it
                np.copyto(host, images[s : s + c])
                if i >= self.slots:
                    self.copy_stream.wait_event(self.consumed[k])  # the device slot's reader has run
                dev.set(host, stream=self.copy_stream)  # from pinned memory: asynchronous
                self.copied[k].record(self.copy_stream)
                rt.stream.wait_event(self.copied[k])
                rt.counters.h2d += 1
            else:
                rt.upload(dev, images[s : s + c])
            compute(dev, out[s : s + c])
            if self.gpu:
                self.consumed[k].record(rt.stream)
        return rt.to_host(out)


def stager(be: Any) -> Stager:
    """The backend's Stager (made at the first call, kept on the backend)."""
    st = getattr(be, "_stager", None)
    if st is None:
        st = be._stager = Stager(be.runtime)
    return st
