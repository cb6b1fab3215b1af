"""Array interop for inference: what ``LeNet5.logits`` / ``predict`` / ``forward_device`` accept and what they return.

An input is one of:

- a host array: a NumPy array, anything ``np.asarray`` takes (lists), or a DLPack producer whose
  ``__dlpack_device__()`` is the CPU (NumPy >= 1.22 arrays, PyTorch CPU tensors, JAX CPU arrays). It goes
  through the host path (``np.from_dlpack``: a view, no copy) and the result is a NumPy array;
- a device array: an object with ``__dlpack__`` / ``__dlpack_device__`` on a CUDA device (CuPy, PyTorch,
  JAX) or with ``__cuda_array_interface__`` (CuPy, Numba device arrays, PyTorch CUDA tensors). It must be on
  the model's device and the model's backend must be a GPU backend; it is wrapped without a copy
  (``cupy.from_dlpack`` / ``cupy.asarray`` on the cupy backend, ``numba.cuda.as_cuda_array`` on numba) and
  the result comes back as an array of the same kind (CuPy in, CuPy out; torch in, torch out through DLPack;
  Numba in, Numba out; JAX in, JAX out; any other producer gets a CuPy array on the cupy backend).

Either kind holds images as

- ``uint8`` of shape (N,28,28): raw pixels (0..255), normalised by the model (``(p/255 - mean)/std``, the
  border padded with pixel 0), exactly as training sees them; or
- ``float32`` of shape (N,28,28): already normalised, ``x = (p/255 - mean)/std`` with the model's ``mean`` and
  ``std``; the model pads the border with the normalised value of pixel 0, ``-mean/std``.

A C-contiguous input is used in place; any other layout (a strided view, a negative stride) is copied once
into a contiguous array on the same side (documented copy: ``Incoming.needs_copy``). Every other case (a wrong
dtype or shape, an empty batch, a device array from another device, a device array given to a CPU backend, a
DLPack device type that is neither CPU nor CUDA) is one ``ArrayInputError`` (a ValueError) whose message says
what was given and what is expected.

The classification (``classify``) needs no GPU and imports no GPU package: it reads only the protocol
attributes, so it is unit-tested with fake objects (tests/test_infer_api.py).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from .spec import IMAGE_HW

#: DLPack device types (dlpack.h DLDeviceType)
KDL_CPU, KDL_CUDA, KDL_CUDA_HOST, KDL_CUDA_MANAGED = 1, 2, 3, 13
_DL_NAMES = {1: "CPU", 2: "CUDA", 3: "CUDA host (pinned)", 4: "OpenCL", 7: "Vulkan", 8: "Metal", 9: "VPI",
             10: "ROCm", 11: "ROCm host", 13: "CUDA managed", 14: "oneAPI"}
#: the input dtypes an inference call takes
INPUT_DTYPES = ("uint8", "float32")
#: module root of an array's type → the kind of array returned for it
_KINDS = {"numpy": "numpy", "torch": "torch", "cupy": "cupy", "cupy_backends": "cupy", "numba": "numba",
          "numba_cuda": "numba", "jax": "jax", "jaxlib": "jax"}


class ArrayInputError(ValueError):
    """An input array the model cannot take (wrong dtype, shape or device). The message is one line."""


@dataclass(frozen=True)
class Incoming:
    """An input as the model sees it.

    where: "host" or "device"; kind: the producer ("numpy", "torch", "cupy", "numba", "jax", "other"), which
    decides the kind of array returned; protocol: how it is read ("numpy", "dlpack", "cai");
    host: the NumPy view (host inputs); obj: the original object; device_id: the CUDA device (device inputs);
    dtype: "uint8" or "float32"; shape: (N,28,28); contiguous: False when a copy is needed to use it.
    """

    where: str
    kind: str
    protocol: str
    obj: Any
    host: np.ndarray | None
    device_id: int | None
    dtype: str
    shape: tuple[int, ...]
    contiguous: bool = True

    @property
    def n(self) -> int:
        return int(self.shape[0])

    @property
    def needs_copy(self) -> bool:
        """True when the layout forces one copy into a contiguous array (on the same side)."""
        return not self.contiguous


def producer_kind(obj: Any) -> str:
    """The array library an object comes from, by its type's module: numpy, torch, cupy, numba, jax or other."""
    mod = type(obj).__module__ or ""
    return _KINDS.get(mod.split(".")[0], "other")


def _dtype_name(dt: Any) -> str:
    """'uint8', 'float32', ... from a NumPy dtype, a torch dtype (torch.uint8) or a CAI typestr ('|u1', '<f4')."""
    if isinstance(dt, str) and dt[:1] in "<>|=" and len(dt) >= 3:
        try:
            return np.dtype(dt).name
        except TypeError:
            return dt
    try:
        return np.dtype(dt).name
    except TypeError:
        return str(dt).rsplit(".", 1)[-1]


def _check(where: str, dtype: str, shape: tuple[int, ...], what: str) -> None:
    if dtype not in INPUT_DTYPES or len(shape) != 3 or tuple(shape[1:]) != (IMAGE_HW, IMAGE_HW):
        raise ArrayInputError(
            f"images must be uint8 (raw pixels) or float32 (normalised) of shape (N,28,28); got {what} {dtype} "
            f"{tuple(shape)}")
    if shape[0] == 0:
        raise ArrayInputError(f"images must hold at least one image; got {what} of shape {tuple(shape)}")


def _c_contiguous(shape: tuple[int, ...], strides: tuple[int, ...] | None, itemsize: int) -> bool:
    """C-contiguity from byte strides (None: C-contiguous by the protocols' convention)."""
    if strides is None:
        return True
    want = itemsize
    for n, s in zip(reversed(shape), reversed(strides), strict=True):
        if n != 1 and s != want:
            return False
        want *= n
    return True


def _host(obj: Any, kind: str, protocol: str, what: str) -> Incoming:
    arr = obj if isinstance(obj, np.ndarray) else None
    if arr is None:
        try:
            arr = np.from_dlpack(obj) if protocol == "dlpack" else np.asarray(obj)
        except (TypeError, ValueError, BufferError, RuntimeError) as e:
            raise ArrayInputError(f"images: cannot read {what} as a host array ({type(e).__name__}: {e})") from None
    dtype = arr.dtype.name
    _check("host", dtype, arr.shape, what)
    return Incoming("host", kind, protocol, obj, arr, None, dtype, tuple(arr.shape), bool(arr.flags.c_contiguous))


def _describe(obj: Any) -> str:
    t = type(obj)
    return f"a {t.__module__}.{t.__qualname__}" if t.__module__ not in ("builtins", None) else f"a {t.__qualname__}"


def _cai_device(obj: Any, pointer_device: Callable[[int], int] | None) -> int | None:
    """The CUDA device of a __cuda_array_interface__ object: its ``device`` attribute where it has one (CuPy:
    .device.id, torch: .device.index), else the pointer's device (``pointer_device``), else None (unknown)."""
    dev = getattr(obj, "device", None)
    for attr in ("id", "index"):
        v = getattr(dev, attr, None)
        if isinstance(v, (int, np.integer)):
            return int(v)
    if pointer_device is not None:
        ptr = obj.__cuda_array_interface__["data"][0]
        if ptr:
            return int(pointer_device(int(ptr)))
    return None


def classify(obj: Any, device_id: int | None, backend_name: str = "this backend",
             pointer_device: Callable[[int], int] | None = None) -> Incoming:
    """What ``obj`` is, checked against the model: ``device_id`` is the model's CUDA device (None for a host
    backend). ``pointer_device`` maps a device pointer to its device (for __cuda_array_interface__ objects that
    do not say). Raises ArrayInputError for anything the model cannot take."""
    what = _describe(obj)
    kind = producer_kind(obj)
    if isinstance(obj, np.ndarray):
        return _host(obj, "numpy", "numpy", what)
    dl_dev = getattr(obj, "__dlpack_device__", None)
    has_cai = hasattr(obj, "__cuda_array_interface__")
    if dl_dev is not None and hasattr(obj, "__dlpack__"):
        dev_type, dev_id = (int(v) for v in dl_dev())
        if dev_type == KDL_CPU:
            return _host(obj, kind, "dlpack", what)
        if dev_type not in (KDL_CUDA, KDL_CUDA_MANAGED):
            name = _DL_NAMES.get(dev_type, f"type {dev_type}")
            raise ArrayInputError(f"images: {what} is on a {name} device; expected a host array or a CUDA array")
        shape = tuple(int(s) for s in obj.shape)
        dtype = _dtype_name(obj.dtype)
        _check("device", dtype, shape, what)
        strides = _strides_of(obj)
        contiguous = _c_contiguous(shape, strides, np.dtype(dtype).itemsize) if strides is not None else \
            _is_contiguous_attr(obj)
        inc = Incoming("device", kind, "dlpack", obj, None, dev_id, dtype, shape, contiguous)
    elif has_cai:
        cai = obj.__cuda_array_interface__
        shape = tuple(int(s) for s in cai["shape"])
        dtype = _dtype_name(cai["typestr"])
        _check("device", dtype, shape, what)
        strides = cai.get("strides")
        contiguous = _c_contiguous(shape, tuple(strides) if strides is not None else None, np.dtype(dtype).itemsize)
        inc = Incoming("device", kind, "cai", obj, None, _cai_device(obj, pointer_device), dtype, shape, contiguous)
    else:
        return _host(obj, kind, "numpy", what)
    if device_id is None:
        raise ArrayInputError(
            f"images: {what} is on CUDA device {inc.device_id}, but {backend_name} runs on the host; pass a host "
            "array (e.g. .cpu().numpy(), cupy.asnumpy) or use a GPU backend (cupy, numba)")
    if inc.device_id is not None and inc.device_id != device_id:
        raise ArrayInputError(
            f"images: {what} is on CUDA device {inc.device_id}, but the model is on device {device_id}; move it "
            f"there first (or build the model under that device)")
    return inc


#: label dtypes a scoring call takes (class ids 0..9)
LABEL_DTYPES = ("uint8", "int8", "int16", "int32", "int64", "uint16", "uint32", "uint64")


def classify_labels(obj: Any, n: int, inc: Incoming) -> Incoming:
    """Labels (n,) of integer class ids beside images ``inc``: on the same side (host with host images, the same
    device with device images), read the same way. One ArrayInputError otherwise."""
    what = _describe(obj)
    if inc.where == "host":
        if isinstance(obj, np.ndarray):
            arr = obj
        elif hasattr(obj, "__dlpack_device__") and hasattr(obj, "__dlpack__") and int(obj.__dlpack_device__()[0]) \
                == KDL_CPU:
            arr = np.from_dlpack(obj)
        elif hasattr(obj, "__dlpack_device__") or _safe_has_cai(obj):
            raise ArrayInputError(f"labels: {what} is a device array but the images are on the host")
        else:
            arr = np.asarray(obj)
        shape, dtype = tuple(arr.shape), arr.dtype.name
        lab = Incoming("host", producer_kind(obj), "numpy", obj, arr, None, dtype, shape, bool(arr.flags.c_contiguous))
    else:
        if hasattr(obj, "__dlpack_device__") and hasattr(obj, "__dlpack__"):
            dev_type, dev_id = (int(v) for v in obj.__dlpack_device__())
            if dev_type == KDL_CPU:
                raise ArrayInputError(f"labels: {what} is a host array but the images are on CUDA device "
                                      f"{inc.device_id}; give both on the same side")
            if dev_type not in (KDL_CUDA, KDL_CUDA_MANAGED):
                raise ArrayInputError(f"labels: {what} is not a CUDA array but the images are")
            shape, dtype, proto = tuple(int(s) for s in obj.shape), _dtype_name(obj.dtype), "dlpack"
        elif _safe_has_cai(obj):
            cai = obj.__cuda_array_interface__
            shape, dtype, proto = tuple(int(s) for s in cai["shape"]), _dtype_name(cai["typestr"]), "cai"
            dev_id = inc.device_id
        else:
            raise ArrayInputError(f"labels: {what} is a host array but the images are on CUDA device "
                                  f"{inc.device_id}; give both on the same side")
        if dev_id is not None and inc.device_id is not None and dev_id != inc.device_id:
            raise ArrayInputError(f"labels: {what} is on CUDA device {dev_id}, the images on {inc.device_id}")
        lab = Incoming("device", producer_kind(obj), proto, obj, None, dev_id, dtype, shape, True)
    if lab.shape != (n,) or lab.dtype not in LABEL_DTYPES:
        raise ArrayInputError(f"labels must be integer class ids of shape ({n},); got {what} {lab.dtype} {lab.shape}")
    return lab


def _strides_of(obj: Any) -> tuple[int, ...] | None:
    """Byte strides of a DLPack producer where it exposes them cheaply (CAI, or NumPy-like .strides in bytes);
    None where unknown (torch's .stride() counts elements: read through _is_contiguous_attr)."""
    cai = getattr(obj, "__cuda_array_interface__", None) if _safe_has_cai(obj) else None
    if isinstance(cai, dict):
        s = cai.get("strides")
        return tuple(s) if s is not None else None
    s = getattr(obj, "strides", None)
    if isinstance(s, tuple) and all(isinstance(v, (int, np.integer)) for v in s):
        return tuple(int(v) for v in s)
    return None


def _safe_has_cai(obj: Any) -> bool:
    try:
        return hasattr(obj, "__cuda_array_interface__")
    except Exception:  # noqa: BLE001 - torch raises (not AttributeError) for tensors that require grad
        return False


def _is_contiguous_attr(obj: Any) -> bool:
    f = getattr(obj, "is_contiguous", None)
    if callable(f):
        return bool(f())
    return True  # JAX arrays are always dense row-major


# ---------------------------------------------------------------------------------------------- device side
def adopt(backend: Any, inc: Incoming) -> Any:
    """The backend's device array over a device input, without a copy where its layout allows (a C-contiguous
    array is wrapped; any other layout is copied once on the device into a contiguous array)."""
    try:
        return _adopt(backend, inc)
    except ArrayInputError:
        raise
    except (TypeError, ValueError, RuntimeError, BufferError) as e:  # e.g. torch: a tensor that requires grad
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ArrayInputError(f"images: cannot use {_describe(inc.obj)} in place ({msg})") from None


def _adopt(backend: Any, inc: Incoming) -> Any:
    name = getattr(backend, "name", "")
    if name == "cupy":
        import cupy

        if isinstance(inc.obj, cupy.ndarray):
            arr = inc.obj
            # the caller's stream (where the array was written) before the backend's: an event, no host sync
            backend.runtime.stream.wait_event(cupy.cuda.get_current_stream().record())
        else:
            with backend.runtime.stream:  # the producer's pending work is ordered before ours (DLPack's stream)
                arr = cupy.from_dlpack(inc.obj) if inc.protocol == "dlpack" else cupy.asarray(inc.obj)
        if not arr.flags.c_contiguous:
            with backend.runtime.stream:
                arr = cupy.ascontiguousarray(arr)  # one device-side copy (documented)
        return arr
    if name == "numba":
        from numba import cuda

        if inc.protocol == "cai" or _safe_has_cai(inc.obj):
            arr = cuda.as_cuda_array(inc.obj)
        else:
            raise ArrayInputError(
                f"images: the numba backend reads device arrays through __cuda_array_interface__, which "
                f"{_describe(inc.obj)} does not offer; use the cupy backend for DLPack-only arrays")
        if not arr.is_c_contiguous():
            out = cuda.device_array(arr.shape, arr.dtype)
            out[...] = arr  # one device-side copy (documented)
            return out
        return arr
    raise ArrayInputError(f"images: device arrays need a GPU backend (cupy or numba); this model runs on {name}")


def export(out: Any, kind: str, backend: Any = None) -> Any:
    """A device result as the kind of array the caller gave (no copy): cupy, torch (DLPack), numba (CUDA array
    interface), jax (DLPack); "other" keeps the backend's own array. On the cupy backend the hand-over happens with
    the backend's stream current, so the consumer's stream waits for the kernels that wrote ``out`` (DLPack's
    stream argument; the CUDA array interface's ``stream`` key)."""
    if getattr(backend, "name", "") == "cupy":
        import cupy

        # the caller's current stream waits for the backend's (an event, no host sync): any use of the result
        # there sees it written; DLPack consumers get the same through the stream argument
        cupy.cuda.get_current_stream().wait_event(backend.runtime.stream.record())
        if kind in (producer_kind(out), "other"):
            return out
        with backend.runtime.stream:
            return _export(out, kind)
    if kind in (producer_kind(out), "other"):
        return out
    return _export(out, kind)


def _export(out: Any, kind: str) -> Any:
    if kind == "torch":
        import torch

        return torch.from_dlpack(out)
    if kind == "cupy":
        import cupy

        return cupy.from_dlpack(out) if hasattr(out, "__dlpack__") else cupy.asarray(out)
    if kind == "numba":
        from numba import cuda

        return cuda.as_cuda_array(out)
    if kind == "jax":
        import jax

        return jax.dlpack.from_dlpack(out)
    return out


def backend_device(backend: Any) -> int | None:
    """The CUDA device a backend runs on (None for a host backend: numpy, cpu, cupy-host)."""
    if not getattr(backend, "is_gpu", False):
        return None
    dev = getattr(backend, "device_id", None)
    if dev is not None:
        return int(dev)
    name = getattr(backend, "name", "")
    if name == "cupy":
        import cupy

        return int(cupy.cuda.Device().id)
    if name == "numba":
        from numba import cuda

        return int(cuda.get_current_device().id)
    return 0


def pointer_device(backend: Any) -> Callable[[int], int] | None:
    """A function mapping a device pointer to its device for the backend (CuPy's pointer attributes), or None."""
    if getattr(backend, "name", "") != "cupy":
        return None

    def lookup(ptr: int) -> int:
        import cupy

        return int(cupy.cuda.runtime.pointerGetAttributes(ptr).device)

    return lookup
