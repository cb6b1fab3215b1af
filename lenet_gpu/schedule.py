"""Learning-rate schedules: the peak learning rate of a run shaped over its optimizer steps.

Used by the training program and the benchmarks (which must train with the same recipe), so it sits
apart from both: it imports nothing of the package.
"""

from __future__ import annotations

import math

SCHEDULES = ("onecycle", "cosine", "constant")


def lr_at(step: int, total: int, peak: float, schedule: str) -> float:
    """The learning rate of optimizer step ``step`` (0-based) out of ``total``.

    onecycle: cosine warm-up from peak/25 to peak over the first 30 % of steps, then cosine
    annealing to peak/1e4 (torch.optim.lr_scheduler.OneCycleLR's shape). cosine: from peak to 0.
    """
    if schedule == "constant" or total <= 1:
        return peak
    if schedule == "cosine":
        return 0.5 * peak * (1 + math.cos(math.pi * step / total))
    if schedule != "onecycle":
        raise ValueError(f"unknown schedule {schedule!r}")
    warm = max(1, int(0.3 * total))
    start, end = peak / 25.0, peak / 25.0 / 1e4
    if step < warm:
        t = step / warm
        return start + (peak - start) * (1 - math.cos(math.pi * t)) / 2
    t = (step - warm) / max(1, total - warm)
    return end + (peak - end) * (1 + math.cos(math.pi * t)) / 2
