"""Two small kernels for the simulator's barrier tests (tests/test_numba_backend.py): kernels must see ``cuda`` as
a module global, which the simulator swaps for its fake module during a launch. Import under the simulator only."""

from __future__ import annotations

from numba import cuda, float32


def _neighbours(barrier: bool):  # noqa: ANN202 - returns a simulator kernel
    @cuda.jit
    def k(out):
        buf = cuda.shared.array(64, float32)
        t = cuda.threadIdx.x
        n = cuda.blockDim.x
        buf[t] = -1.0
        cuda.syncthreads()
        buf[t] = t + 100.0 * cuda.blockIdx.x
        if barrier:
            cuda.syncthreads()
        out[cuda.blockIdx.x, t, 0] = buf[(t + n - 1) % n]
        out[cuda.blockIdx.x, t, 1] = buf[(t + 1) % n]

    return k


#: each thread writes its index to shared memory (filled with -1 first), then reads its two neighbours' values,
#: with the syncthreads between the write and the reads, and without it (the planted bug)
NEIGHBOURS = _neighbours(True)
NEIGHBOURS_NO_BARRIER = _neighbours(False)


@cuda.jit
def EARLY_RETURN(out, bad):  # noqa: N802 - a kernel, named like the constants above
    """Threads 5.. return at once; the rest count the even ones among them, pass a barrier, and write the count;
    thread 3 of block ``bad[0]`` then writes out of bounds."""
    t = cuda.threadIdx.x
    if t >= 5:
        return
    c = cuda.syncthreads_count(t % 2 == 0)
    cuda.syncthreads()
    out[cuda.blockIdx.x, t] = c
    if bad[0] == cuda.blockIdx.x and t == 3:
        out[99, 0] = c
