"""The CuPy stand-in (tests/fake_cupy.py) refuses what CuPy refuses and counts every host↔device copy."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests import fake_cupy as cp


@pytest.fixture(autouse=True)
def zero():
    cp.transfers.reset()


def test_implicit_conversion_to_numpy_raises_cupys_type_error():
    x = cp.asarray(np.arange(6.0))
    for convert in (np.asarray, np.array, lambda v: v.__array__()):
        with pytest.raises(TypeError, match="^Implicit conversion to a NumPy array is not allowed"):
            convert(x)


def test_device_arrays_do_not_mix_with_numpy_arrays():
    x, host = cp.asarray(np.ones(3)), np.ones(3)
    for mixed in (lambda: x + host, lambda: host + x, lambda: np.add(x, host), lambda: cp.stack([x, host]),
                  lambda: np.concatenate([x, host]), lambda: x @ host):
        with pytest.raises(TypeError, match="Unsupported type <class 'numpy.ndarray'>"):
            mixed()


def test_numpy_functions_and_ufuncs_on_device_arrays_stay_on_the_device():
    x = cp.asarray(np.array([[1.0, 2.0], [3.0, 4.0]]))
    for result in (np.exp(x), np.concatenate([x, x]), x.sum(axis=0), x.sum(), x.T @ x, cp.triu_indices(2)[0]):
        assert isinstance(result, cp.FakeArray)
    assert cp.get_array_module(x) is cp and cp.get_array_module(np.ones(1)) is np
    assert cp.asnumpy(x.T @ x).tolist() == [[10.0, 14.0], [14.0, 20.0]]


def test_every_copy_is_counted_each_way():
    x = cp.asarray(np.zeros((4, 5)))            # in: 20
    y = cp.from_dlpack(torch.ones(3, 2))        # in: 6, a CPU tensor entering the device
    x[0] = np.ones(5)                           # in: 5, a host value set into a device array
    z = x + 1.0                                 # on the device: nothing
    cp.asnumpy(z)                               # out: 20
    y.get()                                     # out: 6
    float(z.sum())                              # out: 1
    assert (cp.transfers.to_device, cp.transfers.elements_to_device) == (3, 31)
    assert (cp.transfers.to_host, cp.transfers.elements_to_host) == (3, 27)
    assert cp.asarray(z) is not z and (cp.transfers.to_device, cp.transfers.to_host) == (3, 3)  # device to device: free


def test_the_fixture_installs_the_standin_as_cupy_for_ckapipe(fake_cupy):
    from ckapipe.devices import array_namespace, cupy_module, gpu_available, resolve_device
    from ckapipe.kernels import array_module

    assert cupy_module() is fake_cupy and gpu_available("cupy") and resolve_device("cuda", "cupy") == "cuda"
    assert array_namespace("cuda:0") is fake_cupy and array_namespace("cpu") is np
    assert array_module(fake_cupy.asarray(np.ones(2))) is fake_cupy and array_module(np.ones(2)) is np
