"""The step state: everything a training step needs that changes from step to step, kept on the device.

A training step takes no host scalar. Its kernels read what changes from step to step from three
device buffers, and one kernel (``step_advance``) moves the counters on at the end of the step. So
every launch of a step has the same arguments at every step, and one step, or many, can be recorded
once and replayed, or captured as one CUDA graph (docs/DESIGN.md §4a).

``state``: int32 (STATE_WORDS,)

    STEP             optimizer steps taken so far in the run (Adam's t − 1 during a step)
    SCHED_BASE       the global step of row 0 of the schedule table
    STEP_IN_EPOCH    this step's index in its epoch: the row of ``stats`` it writes
    OFFSET           the position in the epoch's permutation of this batch's first sample
    EPOCH            the epoch (augmentation draws its shifts from it)
    STEPS_PER_EPOCH  when STEP_IN_EPOCH reaches it, step_advance starts the next epoch
    SEED             the augmentation seed (its low 32 bits)
    SHIFT            the largest augmentation shift in pixels (0: no augmentation)

``sched``: float32 (T, 4), one row per step of the run from SCHED_BASE on: [lr, bc1, bc2, 0], with
bc1 = 1 − β1^t and bc2 = 1 − β2^t for Adam's t = step + 1, computed in float64 on the host and rounded
once, as the optimizer kernels used to receive them. The optimizers read row
clamp(STEP − SCHED_BASE, 0, T − 1).

``stats``: float32 (S, 2): the loss op writes [Σ loss, correct count] of the step into row
STEP_IN_EPOCH (overwriting it), so the host reads a whole chunk or epoch of per-step figures with one
copy, and a NaN names its step.

``step_advance(state, batch)``: STEP += 1; STEP_IN_EPOCH += 1; OFFSET += batch; and when
STEP_IN_EPOCH == STEPS_PER_EPOCH: STEP_IN_EPOCH = 0, OFFSET = 0, EPOCH += 1.

The only host work per epoch is the upload of that epoch's permutation.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

STEP, SCHED_BASE, STEP_IN_EPOCH, OFFSET, EPOCH, STEPS_PER_EPOCH, SEED, SHIFT = range(8)
STATE_WORDS = 8
FIELDS = ("step", "sched_base", "step_in_epoch", "offset", "epoch", "steps_per_epoch", "seed", "shift")
SCHED_COLS = 4  # lr, bc1, bc2, unused (a row is 16 bytes)
#: STEPS_PER_EPOCH of a state that never wraps (evaluation, host batches)
NO_WRAP = 2**31 - 1


@dataclass
class HostState:
    """A host copy of the state words (for checkpoints and for setting the device state)."""

    step: int = 0
    sched_base: int = 0
    step_in_epoch: int = 0
    offset: int = 0
    epoch: int = 0
    steps_per_epoch: int = NO_WRAP
    seed: int = 0
    shift: int = 0

    def to_array(self) -> np.ndarray:
        words = [getattr(self, f) for f in FIELDS]
        words[SEED] = _as_int32(words[SEED])
        return np.array(words, dtype=np.int32)

    @classmethod
    def from_array(cls, arr: np.ndarray) -> HostState:
        arr = np.asarray(arr)
        if arr.shape != (STATE_WORDS,):
            raise ValueError(f"a step state has {STATE_WORDS} words, got shape {arr.shape}")
        return cls(**{f: int(v) for f, v in zip(FIELDS, arr.tolist())})


def _as_int32(v: int) -> int:
    """The low 32 bits of v as a signed int32 value (the seed may be any integer)."""
    v = int(v) & 0xFFFFFFFF
    return v - (1 << 32) if v >= 1 << 31 else v


def advance(state: HostState, batch: int) -> HostState:
    """What ``step_advance`` does, on a host copy (the reference of the kernel)."""
    s = HostState(**vars(state))
    s.step += 1
    s.step_in_epoch += 1
    s.offset += batch
    if s.step_in_epoch == s.steps_per_epoch:
        s.step_in_epoch, s.offset = 0, 0
        s.epoch += 1
    return s


def step_advance_words(state: np.ndarray, batch: int) -> None:
    """``step_advance`` on the int32 state words in place: the numpy backend's op, and the cpu backend's
    kernel (this function compiled by Numba). ``advance`` is its reference on a HostState."""
    state[STEP] += 1
    state[STEP_IN_EPOCH] += 1
    state[OFFSET] += batch
    if state[STEP_IN_EPOCH] == state[STEPS_PER_EPOCH]:
        state[STEP_IN_EPOCH] = 0
        state[OFFSET] = 0
        state[EPOCH] += 1


def schedule_table(lrs: np.ndarray, first_step: int, beta1: float, beta2: float) -> np.ndarray:
    """The float32 (T, 4) schedule for steps first_step .. first_step + T − 1: [lr, 1 − β1^t, 1 − β2^t, 0]
    with t = step + 1, in float64 and rounded once."""
    lrs = np.asarray(lrs, dtype=np.float64).reshape(-1)
    if lrs.size == 0:
        raise ValueError("a schedule needs at least one step")
    t = np.arange(first_step + 1, first_step + 1 + lrs.size, dtype=np.float64)
    table = np.zeros((lrs.size, SCHED_COLS), dtype=np.float64)
    table[:, 0] = lrs
    table[:, 1] = 1.0 - np.power(float(beta1), t)
    table[:, 2] = 1.0 - np.power(float(beta2), t)
    return table.astype(np.float32)


def sched_row(state_arr: np.ndarray, sched: np.ndarray) -> np.ndarray:
    """The schedule row a step with this state reads (the clamp the kernels apply)."""
    i = int(state_arr[STEP]) - int(state_arr[SCHED_BASE])
    return sched[min(max(i, 0), sched.shape[0] - 1)]


def advance_by(state: HostState, batch: int, count: int) -> HostState:
    """``count`` calls of ``advance`` at once (closed form; every batch of a run has the same size)."""
    s = HostState(**vars(state))
    s.step += count
    total = s.step_in_epoch + count
    if s.steps_per_epoch > 0 and total >= s.steps_per_epoch:
        s.epoch += total // s.steps_per_epoch
        total %= s.steps_per_epoch
        s.offset = total * batch
    else:
        s.offset += count * batch
    s.step_in_epoch = total
    return s


class StepState:
    """The three device buffers of a run's step state (``state``, ``sched``, ``stats``) and a host mirror
    of the state words, which the host advances as it issues steps, so it knows where a run stands
    without reading the device."""

    def __init__(self, backend, sched_rows: int = 1, stats_rows: int = 1) -> None:
        self.backend = backend
        self.host = HostState()
        self.state = backend.zeros((STATE_WORDS,), np.int32)
        self.sched = backend.zeros((sched_rows, SCHED_COLS))
        self.stats = backend.zeros((stats_rows, 2))

    def set(self, host: HostState) -> None:
        """Write the state words (one small upload)."""
        self.host = HostState(**vars(host))
        self.backend.upload(self.state, host.to_array())

    def set_schedule(self, table: np.ndarray) -> None:
        """Install a (T, 4) schedule table (reallocated when T changes: once per run)."""
        table = np.asarray(table, np.float32)
        if tuple(self.sched.shape) != table.shape:
            self.sched = self.backend.empty(table.shape)
        self.backend.upload(self.sched, table)

    def ensure_stats(self, rows: int) -> None:
        if self.stats.shape[0] != rows:
            self.stats = self.backend.zeros((rows, 2))

    def issued(self, batch: int, count: int) -> None:
        """The host has issued ``count`` steps of ``batch`` images: move the mirror on."""
        self.host = advance_by(self.host, batch, count)

    def read_stats(self, first: int, count: int) -> np.ndarray:
        """Rows first .. first+count−1 of the per-step statistics (one copy; waits for the steps)."""
        rows = self.backend.to_host(self.stats)
        return rows[first : first + count].astype(np.float64)

    def read_state(self) -> HostState:
        """The device's state words (one copy; waits)."""
        return HostState.from_array(self.backend.to_host(self.state))
