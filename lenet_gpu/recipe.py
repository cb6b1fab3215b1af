"""The training recipe's defaults, and what each dataset changes of them.

They live below the programs (``lenet_gpu.train``, ``bench``, the self-test), which all read them here.
"""

from __future__ import annotations

from typing import Any

DEFAULTS: dict[str, Any] = {
    "epochs": 15,
    "batch_size": 64,
    "optimizer": "adam",
    "lr": None,  # adam: 2e-3 peak, sgd: 0.05 peak
    "schedule": "onecycle",
    "weight_decay": 0.0,
    "momentum": 0.9,
    "activation": "relu",
    "pool": "max",
    "f6": 84,
    "seed": 0,
    "augment": 2,
    "init": "torch",
}
DEFAULT_LR = {"adam": 2e-3, "sgd": 0.05}
#: What each built-in dataset changes of DEFAULTS (measured at 10 and 15 epochs against PyTorch's plain
#: recipe; README "Datasets"): MNIST's 2-pixel shifts cost Fashion-MNIST accuracy, and mnist-sample does
#: best with 1 pixel; Fashion-MNIST does best with the peak rate held longer ("hold"). A folder given by
#: --data-dir gets no augmentation: shifts assume centred digits.
DATASET_DEFAULTS: dict[str, dict[str, Any]] = {
    "mnist": {"augment": 2},
    "mnist-sample": {"augment": 1},
    "fashion-mnist": {"augment": 0, "schedule": "hold"},
}
DIR_DEFAULTS: dict[str, Any] = {"augment": 0}
