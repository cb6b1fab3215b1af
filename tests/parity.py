"""The parity helper of the tests: re-exported from the package (lenet_gpu.parity), where the self-test
(``python -m lenet_gpu.selftest``) can use it installed, with no tests/ folder."""

from lenet_gpu.parity import TOL, assert_close, assert_equal, error_stats, nan_like, rand

__all__ = ["TOL", "assert_close", "assert_equal", "error_stats", "nan_like", "rand"]
