"""Where training runs keep their files, so that runs never overwrite each other.

A run writes a checkpoint (``runs/lenet5.npz``) and its metrics (``runs/lenet5.metrics.jsonl``). Without
``--checkpoint``, each new run of the training program takes the first free name: ``runs/lenet5.npz``, then
``runs/lenet5-2.npz``, ``runs/lenet5-3.npz``, ... (a name is free when neither the checkpoint nor its metrics
file exists). A named ``--checkpoint`` that exists is refused unless ``--overwrite`` or ``--resume`` says what
to do with it. The other programs (evaluate, visualize, predict) and ``train --resume`` take the latest run
by default: the most recently written checkpoint in ``runs/``.
"""

from __future__ import annotations

import os
from pathlib import Path

#: the folder of the runs, relative to the working directory
RUNS_DIR = Path("runs")
#: the name of a run's checkpoint, before its number
STEM = "lenet5"


class NoRun(Exception):
    """No checkpoint to take by default: the message is one line that says what to do."""


def metrics_path_for(checkpoint: str | os.PathLike) -> Path:
    """The metrics file of a checkpoint: runs/lenet5.npz → runs/lenet5.metrics.jsonl."""
    p = Path(checkpoint)
    stem = p.name[: -len(p.suffix)] if p.suffix else p.name
    return p.with_name(stem + ".metrics.jsonl")


def is_taken(checkpoint: str | os.PathLike) -> bool:
    """Whether a run already wrote this checkpoint or its metrics file."""
    p = Path(checkpoint)
    return p.exists() or metrics_path_for(p).exists()


def new_checkpoint(folder: str | os.PathLike = RUNS_DIR) -> Path:
    """The checkpoint of a new run in ``folder``: lenet5.npz, or the first of lenet5-2.npz, lenet5-3.npz, ...
    whose checkpoint and metrics files are both absent."""
    folder = Path(folder)
    path = folder / f"{STEM}.npz"
    n = 2
    while is_taken(path):
        path = folder / f"{STEM}-{n}.npz"
        n += 1
    return path


def latest_checkpoint(folder: str | os.PathLike = RUNS_DIR) -> Path:
    """The most recently written checkpoint (``*.npz``) in ``folder``: the latest run (a checkpoint is
    rewritten after every epoch). Raises :class:`NoRun` when there is none."""
    folder = Path(folder)
    try:
        found = [p for p in folder.iterdir() if p.suffix == ".npz" and not p.name.startswith(".") and p.is_file()]
    except OSError:
        found = []
    if not found:
        raise NoRun(f"no checkpoint in {folder}/ to take as the latest run; train one with python -m lenet_gpu.train "
                    "or name a checkpoint")
    return max(found, key=lambda p: (p.stat().st_mtime_ns, p.name))
