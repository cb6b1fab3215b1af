"""python -m lenet_gpu.selftest (see lenet_gpu/selftest/__init__.py and docs/selftest.md)."""

import sys

from .runner import main

sys.exit(main())
