"""Exceptions shared across the layers, defined below all of them so that any layer may raise or catch them
without importing the one above (docs/DESIGN.md §2): the CPU harness raises ``BackendUnavailable`` (through
``CompilerUnavailable``) without importing the backends that sit on top of it. ``lenet_gpu.backends``
re-exports it, so ``from lenet_gpu.backends import BackendUnavailable`` keeps working."""

from __future__ import annotations


class BackendUnavailable(RuntimeError):
    """The backend cannot run here (no CUDA device, package missing). The message is one clear line."""


__all__ = ["BackendUnavailable"]
