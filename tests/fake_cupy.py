"""A test-only stand-in for CuPy, backed by NumPy, that behaves like CuPy where bugs hide (issue 21).

Its arrays (``FakeArray``) live on a pretend device: like CuPy's, they refuse implicit conversion to
NumPy (``np.asarray(x)`` and ``x.__array__()`` raise TypeError with CuPy's message), they refuse to
mix with NumPy arrays in arithmetic, ufuncs and NumPy functions, and they leave the device only
through ``get``/``asnumpy``/``float``/``item``/``tolist``. Every host↔device copy is counted in
``transfers`` (``to_device`` and ``to_host``, by element count too), so a test can assert what one
minibatch moves. Install it with the ``fake_cupy`` fixture (tests/conftest.py), which puts it in
``sys.modules["cupy"]``: ckapipe obtains CuPy only through ``ckapipe.devices.cupy_module``.
"""

from __future__ import annotations

import contextlib
import types
from dataclasses import dataclass, field

import numpy as np

IMPLICIT = ("Implicit conversion to a NumPy array is not allowed. "
            "Please use `.get()` to construct a NumPy array explicitly.")
__version__ = "14.0.0"  # a CuPy version (xarray and dask parse it); the stand-in says what it is in __doc__


@dataclass
class Transfers:
    """Host↔device copies: how many, and how many elements, each way."""

    to_device: int = 0
    to_host: int = 0
    elements_to_device: int = 0
    elements_to_host: int = 0
    log: list = field(default_factory=list)

    def count(self, way: str, size: int) -> None:
        setattr(self, way, getattr(self, way) + 1)
        setattr(self, f"elements_{way}", getattr(self, f"elements_{way}") + int(size))
        self.log.append((way, int(size)))

    def reset(self) -> None:
        self.__init__()


transfers = Transfers()


def _unwrap(x):
    """The NumPy array behind a FakeArray, recursing into lists, tuples and dicts (device to device: free)."""
    if isinstance(x, FakeArray):
        return x._a
    if isinstance(x, (list, tuple)):
        return type(x)(_unwrap(v) for v in x)
    if isinstance(x, dict):
        return {k: _unwrap(v) for k, v in x.items()}
    return x


def _wrap(x):
    if isinstance(x, np.ndarray):
        return FakeArray(x)
    if isinstance(x, np.generic):  # CuPy's reductions give 0-d device arrays, not host scalars
        return FakeArray(np.asarray(x))
    if isinstance(x, tuple):
        return tuple(_wrap(v) for v in x)
    if isinstance(x, list):
        return [_wrap(v) for v in x]
    return x


def _refuse_host(values, what: str) -> None:
    """CuPy's TypeError for a NumPy array where a device array must be."""
    for v in values:
        if isinstance(v, np.ndarray) and not isinstance(v, FakeArray):
            raise TypeError(f"Unsupported type {type(v)} in {what}: a NumPy array on a device (cupy stand-in)")
        if isinstance(v, (list, tuple)):
            _refuse_host(v, what)


def _binary(name):
    def op(self, other):
        _refuse_host([other], f"ndarray.{name}")
        return _wrap(getattr(self._a, name)(_unwrap(other)))

    op.__name__ = name
    return op


def _inplace(name):
    def op(self, other):
        _refuse_host([other], f"ndarray.{name}")
        getattr(self._a, name)(_unwrap(other))
        return self

    op.__name__ = name
    return op


class FakeArray:
    """A device array: a NumPy array that NumPy may not see."""

    __slots__ = ("_a",)
    __array_priority__ = 100

    def __init__(self, a: np.ndarray):
        self._a = a

    def __array__(self, *args, **kwargs):
        raise TypeError(IMPLICIT)

    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        _refuse_host(list(inputs) + list(kwargs.get("out", ())), f"numpy.{ufunc.__name__}")
        return _wrap(getattr(ufunc, method)(*_unwrap(inputs), **_unwrap(kwargs)))

    def __array_function__(self, func, types_, args, kwargs):
        _refuse_host(list(args) + list(kwargs.values()), f"numpy.{func.__name__}")
        return _wrap(func(*_unwrap(args), **_unwrap(kwargs)))

    # leaving the device: counted
    def get(self, stream=None, out=None):
        transfers.count("to_host", self._a.size)
        return self._a.copy()

    def item(self):
        transfers.count("to_host", 1)
        return self._a.item()

    def tolist(self):
        transfers.count("to_host", self._a.size)
        return self._a.tolist()

    def __float__(self):
        return float(self.item())

    def __int__(self):
        return int(self.item())

    def __bool__(self):
        return bool(self.item())

    def __index__(self):
        raise TypeError("only integer scalar arrays can be converted to a scalar index (cupy stand-in)")

    # the array's face
    shape = property(lambda self: self._a.shape)
    dtype = property(lambda self: self._a.dtype)
    ndim = property(lambda self: self._a.ndim)
    size = property(lambda self: self._a.size)
    nbytes = property(lambda self: self._a.nbytes)
    itemsize = property(lambda self: self._a.itemsize)
    strides = property(lambda self: self._a.strides)
    flags = property(lambda self: self._a.flags)
    T = property(lambda self: FakeArray(self._a.T))
    device = property(lambda self: cuda.Device(0))

    def __len__(self):
        return len(self._a)

    def __iter__(self):
        return (_wrap(v) if isinstance(v, np.ndarray) else FakeArray(np.asarray(v)) for v in self._a)

    def __repr__(self):
        return f"FakeArray(shape={self._a.shape}, dtype={self._a.dtype})"

    def __getitem__(self, index):
        return _wrap(self._a[_unwrap(index)])

    def __setitem__(self, index, value):
        if isinstance(value, np.ndarray) and not isinstance(value, FakeArray):
            transfers.count("to_device", value.size)  # CuPy copies a host value to the device
        self._a[_unwrap(index)] = _unwrap(value)

    def __getattr__(self, name):
        if name.startswith("__"):  # no __array_interface__, __array_struct__: NumPy must not see the data
            raise AttributeError(name)
        attr = getattr(self._a, name)
        if not callable(attr):
            return _wrap(attr)
        return lambda *args, **kwargs: _wrap(attr(*_unwrap(args), **_unwrap(kwargs)))

    def __neg__(self):
        return FakeArray(-self._a)

    def __abs__(self):
        return FakeArray(abs(self._a))

    def __pos__(self):
        return self

    def __invert__(self):
        return FakeArray(~self._a)

    def __dlpack__(self, *args, **kwargs):
        return self._a.__dlpack__(*args, **kwargs)

    def __dlpack_device__(self):
        return (2, 0)  # kDLCUDA: a consumer sees device memory

    def toDlpack(self):  # noqa: N802 - CuPy's name
        return self._a.__dlpack__()


for _name in ("add", "sub", "mul", "truediv", "floordiv", "mod", "pow", "matmul", "and", "or", "xor",
              "lt", "le", "gt", "ge", "eq", "ne", "lshift", "rshift"):
    setattr(FakeArray, f"__{_name}__", _binary(f"__{_name}__"))
    if _name not in ("lt", "le", "gt", "ge", "eq", "ne"):
        setattr(FakeArray, f"__r{_name}__", _binary(f"__r{_name}__"))
        setattr(FakeArray, f"__i{_name}__", _inplace(f"__i{_name}__"))
FakeArray.__hash__ = None
ndarray = FakeArray  # isinstance(x, cupy.ndarray), as xarray and dask ask


# --------------------------------------------------------------------------- the module's functions

def asarray(a, dtype=None, order=None, *, blocking=False):
    """A device array of a: a copy to the device (counted) for host data, free for a device array."""
    if isinstance(a, FakeArray):
        return FakeArray(np.asarray(a._a, dtype=dtype, order=order))
    host = np.asarray(a, dtype=dtype, order=order)
    transfers.count("to_device", host.size)
    return FakeArray(host.copy())


def array(a, dtype=None, copy=True, order="K", ndmin=0):
    if isinstance(a, FakeArray):
        return FakeArray(np.array(a._a, dtype=dtype, copy=copy, order=order, ndmin=ndmin))
    return asarray(np.array(a, dtype=dtype, order=order, ndmin=ndmin))


def asnumpy(a, stream=None, order="C", out=None, blocking=True):
    """The host copy of a device array (counted); host data as NumPy, as CuPy does."""
    return a.get() if isinstance(a, FakeArray) else np.asarray(a, order=order)


def get_array_module(*args):
    return _this if any(isinstance(a, FakeArray) for a in args) else np


def from_dlpack(x):
    """A device array from a DLPack producer. A CPU torch tensor crosses here: the features enter the
    pretend device, counted as one copy to the device."""
    if isinstance(x, FakeArray):
        return x
    host = np.from_dlpack(x)
    transfers.count("to_device", host.size)
    return FakeArray(host.copy())


fromDlpack = from_dlpack  # noqa: N816 - CuPy's old name


def _device_function(name):
    """numpy.NAME on device arrays: NumPy arrays refused, NumPy results returned as device arrays."""
    func = getattr(np, name)

    def call(*args, **kwargs):
        _refuse_host(list(args) + list(kwargs.values()), f"cupy.{name}")
        return _wrap(func(*_unwrap(args), **_unwrap(kwargs)))

    call.__name__ = name
    return call


def __getattr__(name):
    """Every other NumPy name: dtypes and constants as they are, functions through ``_device_function``."""
    value = getattr(np, name)
    if isinstance(value, (type, float, int, np.dtype)) or not callable(value):
        return value
    if isinstance(value, np.ufunc) or callable(value):
        return _device_function(name)
    return value


def get_default_memory_pool():
    return _MemoryPool()


class _MemoryPool:
    def total_bytes(self) -> int:
        return 0

    def used_bytes(self) -> int:
        return 0

    def free_all_blocks(self) -> None:
        return None


# --------------------------------------------------------------------------- cupy.cuda

class _Device:
    def __init__(self, device=None):
        self.id = 0 if device is None else int(device)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def use(self):
        return None

    def synchronize(self):
        return None


class _Stream:
    null = None

    def __init__(self, non_blocking=False):
        self.non_blocking = non_blocking

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def synchronize(self):
        return None

    def use(self):
        return self


_Stream.null = _Stream()

cuda = types.SimpleNamespace(
    Device=_Device,
    Stream=_Stream,
    get_current_stream=lambda: _Stream.null,
    runtime=types.SimpleNamespace(getDeviceCount=lambda: 1),
    is_available=lambda: True,
)

random = types.SimpleNamespace(default_rng=lambda seed=None: _Rng(seed))


class _Rng:
    def __init__(self, seed):
        self._rng = np.random.default_rng(seed)

    def __getattr__(self, name):
        method = getattr(self._rng, name)
        return lambda *args, **kwargs: _wrap(method(*args, **kwargs))


@contextlib.contextmanager
def counting():
    """Transfers counted from zero inside the block."""
    transfers.reset()
    yield transfers


import sys as _sys  # noqa: E402

_this = _sys.modules[__name__]
