"""``python -m lenet_gpu`` is ``python -m lenet_gpu.train``."""

import sys

from .train import main

sys.exit(main())
