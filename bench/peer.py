"""The PyTorch peer lives in the package (lenet_gpu.perf.peer), so that the self-test uses the same one where
bench/ is absent; this name stays for the scripts that import it from here."""

from lenet_gpu.perf.peer import MODES, TorchLeNet, lenet_module, mode_unavailable, torch_info, torch_or_none

__all__ = ["MODES", "TorchLeNet", "lenet_module", "mode_unavailable", "torch_info", "torch_or_none"]
