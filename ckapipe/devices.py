"""Device names: ``auto``, ``cpu``, ``cuda`` or ``cuda:i``, resolved the same way by both stages.

The extraction runs the model with torch; the analysis multiplies Grams with
CuPy. Each asks for the device through ``resolve_device`` with the library it
will use, so ``auto`` means "a GPU that library can use" and ``cuda`` without
one is a one-line error.
"""

from __future__ import annotations

import re

import numpy as np

from ckapipe.errors import CkapipeError

DEVICE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


def resolve_device(device: str = "auto", library: str = "torch") -> str:
    """``cpu`` or ``cuda[:i]`` for the given library (``torch`` or ``cupy``)."""
    device = str(device)
    if not DEVICE.match(device):
        raise CkapipeError(f"unknown device {device!r}: use auto, cpu, cuda or cuda:i")
    if device == "cpu":
        return "cpu"
    has_gpu = gpu_available(library)
    if device == "auto":
        return "cuda" if has_gpu else "cpu"
    if not has_gpu:
        need = "CuPy and a CUDA GPU (pip install 'ckapipe[gpu]')" if library == "cupy" else "a CUDA GPU that torch can use"
        raise CkapipeError(f"--device {device} needs {need}, and none is available: use --device cpu")
    return device


def gpu_available(library: str = "torch") -> bool:
    """True when ``library`` (torch or cupy) sees a CUDA GPU; never raises."""
    try:
        if library == "torch":
            import torch  # optional: torch (the analysis alone needs none)

            return bool(torch.cuda.is_available())
        cupy = cupy_module()
        return cupy is not None and cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:  # noqa: BLE001 - no driver, no device
        return False


def cupy_module():
    """The ``cupy`` module, or None when it is not installed.

    The one place ckapipe obtains CuPy (the analysis, ``compare``, the extraction's device Grams,
    ``gpu_available``): ``import cupy`` takes ``sys.modules["cupy"]`` first, so a test that puts
    tests/fake_cupy.py there runs every CuPy path on the CPU (docs/testing.md).
    """
    try:
        import cupy  # optional: cupy (pip install 'ckapipe[gpu]')
    except ImportError:
        return None
    return cupy


def array_namespace(device: str):
    """numpy for "cpu", cupy for "cuda[:i]" (a device that ``resolve_device(..., "cupy")`` accepted)."""
    if not str(device).startswith("cuda"):
        return np
    cupy = cupy_module()
    if cupy is None:
        raise CkapipeError(f"--device {device} needs CuPy (pip install 'ckapipe[gpu]'): use --device cpu")
    return cupy
