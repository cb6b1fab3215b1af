"""Shared-memory wavefronts of the convolutions' window reads: a bank model, no GPU.

A warp's shared-memory load is served in *wavefronts*: each of the 32 banks (4-byte words, bank = word mod 32)
delivers one word a wavefront, and lanes that read the same word share it (a broadcast). The model used here is
the one the CUDA programming guide describes and Nsight Compute's ``l1tex__data_bank_conflicts`` counts follow:

- a 32-bit load: the largest number of distinct words any one bank must deliver (1 = conflict-free);
- a 64-bit load: the warp in two half-warps (lanes 0-15, 16-31), each served on its own, so 2 at the least.

It is an estimate: the hardware may merge half-warps that read the same words, which this model does not count
(it errs high for such patterns, never low).

The patterns are the window reads of the 2x2-pooled convolutions as the kernels index them: ``lf_conv`` of
kernels/lenet_fwd.cu (lenet_fwd v2-v4) and ``sf_c1`` / ``sf_c3`` of kernels/step_fwd.cu. A thread reads a 6 x 6
window: 6 rows of 6 consecutive floats from an even column (C1 from the 32x32 padded input, C3 from each of S2's
six 14x14 planes). The kernels read a row as three 64-bit loads (``load_row2`` in kernels/common.cuh); as six
32-bit loads the same reads took twice the instructions and ~1.4x the wavefronts. The stride-2 windows of a warp
start on 16 of the 32 banks and span 2-3 rows of pixels, so some conflict remains: C3's 14-wide S2 planes put
three of a half-warp's pixels on one bank pair.

``python -m bench.smem_banks`` prints the table (per image: warp-instructions and wavefronts);
``python scripts/kernel_report.py`` writes it to reports/smem_banks.md.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

BANKS = 32
WARP = 32


def wavefronts(addresses: Sequence[int | None], words: int) -> int:
    """Wavefronts of one warp-wide load: ``addresses[lane]`` is the lane's first 4-byte word (None: the lane is
    inactive), each lane reads ``words`` (1: 32-bit, 2: 64-bit) consecutive words."""
    if words not in (1, 2):
        raise ValueError(f"words: 1 (32-bit) or 2 (64-bit), not {words}")
    if len(addresses) > WARP:
        raise ValueError(f"a warp has {WARP} lanes, not {len(addresses)}")
    phase = WARP if words == 1 else WARP // 2
    total = 0
    for start in range(0, WARP, phase):
        banks: dict[int, set[int]] = {}
        for a in addresses[start:start + phase]:
            if a is None:
                continue
            if words == 2 and a % 2:
                raise ValueError(f"a 64-bit load needs an even word address, not {a}")
            for w in range(words):
                banks.setdefault((a + w) % BANKS, set()).add(a + w)
        total += max((len(s) for s in banks.values()), default=0)
    return total


@dataclass(frozen=True)
class Pattern:
    """A stage's window reads: ``items`` work items of ``threads``-thread rounds (item = round * threads + tid);
    ``address(item, row, col)`` the word a thread reads at window (row, col), ``rows`` × ``cols`` of them (C3: 6
    channels × 6 rows, the channel in ``address``'s row); ``images`` the images the items cover."""

    name: str
    items: int
    threads: int
    address: Callable[[int, int, int], int]
    rows: int = 6
    cols: int = 6
    images: int = 1

    def cost(self, words: int) -> tuple[float, float]:
        """(warp-instructions, wavefronts) an image, the rows read as ``words``-word loads."""
        ins = wf = 0
        for base in range(0, self.items, self.threads):
            for w0 in range(0, self.threads, WARP):
                active = [it if it < self.items and w0 + lane < self.threads else None
                          for lane, it in enumerate(range(base + w0, base + w0 + WARP))]
                if all(a is None for a in active):
                    continue
                for r in range(self.rows):
                    for c in range(0, self.cols, words):
                        addrs = [None if it is None else self.address(it, r, c) for it in active]
                        ins += 1
                        wf += wavefronts(addrs, words)
        return ins / self.images, wf / self.images


# lenet_fwd (lf_conv): 224 threads; image m's padded input at m * IS (32x32), its S2 at m * IS + XR (6 x 14x14)
LF_THREADS, LF_IS, LF_XR = 224, 1024 + 1176, 1024


def lenet_fwd_c1(imgs: int) -> Pattern:
    def address(it: int, r: int, c: int) -> int:
        m, pp = divmod(it, 196)
        ph, pw = divmod(pp, 14)
        return m * LF_IS + 2 * ph * 32 + 2 * pw + r * 32 + c

    return Pattern(f"lenet_fwd C1 ({imgs} image{'s' * (imgs > 1)} a pass)", imgs * 196, LF_THREADS, address,
                   images=imgs)


def lenet_fwd_c3(imgs: int) -> Pattern:
    def address(it: int, r: int, c: int) -> int:
        m, rest = divmod(it, 4 * 25)
        pp = rest % 25
        ph, pw = divmod(pp, 5)
        ch, row = divmod(r, 6)
        return m * LF_IS + LF_XR + ch * 196 + 2 * ph * 14 + 2 * pw + row * 14 + c

    return Pattern(f"lenet_fwd C3 ({imgs} image{'s' * (imgs > 1)} a pass)", imgs * 100, LF_THREADS, address,
                   rows=6 * 6, images=imgs)


# step_fwd (sf_c1 / sf_c3): 256 threads; v1 one image a block (C1: 196 items, C3: 8 filter pairs x 25 pixels);
# v2 two images (C1 two rounds of 392 items, C3: 4 filter quads x 25 pixels x 2 images)
SF_THREADS = 256


def step_fwd_c1(imgs: int) -> Pattern:
    def address(it: int, r: int, c: int) -> int:
        m, pp = divmod(it, 196)
        ph, pw = divmod(pp, 14)
        return m * 1024 + 2 * ph * 32 + 2 * pw + r * 32 + c

    return Pattern(f"step_fwd_v{imgs} C1", imgs * 196, SF_THREADS, address, images=imgs)


def step_fwd_c3(imgs: int) -> Pattern:
    groups = 8 if imgs == 1 else 4  # filter groups: v1 SF_KB3 = 2 filters a thread, v2 4

    def address(it: int, r: int, c: int) -> int:
        m, rest = divmod(it, groups * 25)
        pp = rest % 25
        ph, pw = divmod(pp, 5)
        ch, row = divmod(r, 6)
        return m * 1176 + ch * 196 + 2 * ph * 14 + 2 * pw + row * 14 + c

    return Pattern(f"step_fwd_v{imgs} C3", imgs * groups * 25, SF_THREADS, address, rows=6 * 6, images=imgs)


def patterns() -> list[Pattern]:
    """lenet_fwd's conv passes at 1 image (v3's small-batch tiles), 2 (v4's conv groups) and 4 (v2/v3's tiles);
    step_fwd v1 and v2."""
    return [lenet_fwd_c1(1), lenet_fwd_c3(1), lenet_fwd_c1(2), lenet_fwd_c3(2), lenet_fwd_c1(4), lenet_fwd_c3(4),
            step_fwd_c1(1), step_fwd_c3(1), step_fwd_c1(2), step_fwd_c3(2)]


def table() -> str:
    rows = ["| window reads | 32-bit: instructions / wavefronts an image | 64-bit (the kernels) | wavefronts saved |",
            "| --- | --- | --- | --- |"]
    for p in patterns():
        i1, w1 = p.cost(1)
        i2, w2 = p.cost(2)
        rows.append(f"| {p.name} | {i1:,.0f} / {w1:,.0f} | {i2:,.0f} / {w2:,.0f} | {1 - w2 / w1:.0%} |")
    return "\n".join(rows)


def write_markdown(out_dir: Path) -> Path:
    """The table as ``out_dir/smem_banks.md`` (scripts/kernel_report.py writes it beside the fill table)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "smem_banks.md"
    path.write_text("# Shared-memory wavefronts of the convolutions' window reads\n\n"
                    "Estimated, not measured: bench/smem_banks.py's bank model (a 32-bit load: the most distinct "
                    "words a bank delivers; a 64-bit load: per half-warp). Per image.\n\n" + table() + "\n")
    return path


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.smem_banks",
        description="Shared-memory wavefronts of the convolutions' window reads (lenet_fwd, step_fwd), 32-bit "
                    "against 64-bit row loads, by the bank model in this module's docstring. No GPU needed.")
    parser.parse_args(argv)
    print(table())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
