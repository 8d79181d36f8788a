"""The feature source: a model and its selected layers turned into each minibatch's features on the device.

Both ``extract_run`` (which stores the features) and ``compare`` (which hands them straight to the
Gram accumulator, ``ckapipe.analyze.accumulate``) build their models' features here, so a change to how
a stage records (hooks, ``Recorder``), moves (device) or checks (dtype) its features is made once:

    probe_inputs(feed, device)          the feed's first inputs, dtype-checked, on the device
    feature_source(loaded, ...)         the model on the device, its layers checked and probed once
    FeatureSource.features(inputs)      one forward: layer name -> (m, D) features on the device
    feature_arrays(features, xp)        the same as arrays of the kernels' array module, without a copy

torch is imported here: this module is the extraction floor's, never imported by ``ckapipe.analyze``.
"""

from __future__ import annotations

import contextlib
import os
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from ckapipe.devices import cupy_module
from ckapipe.errors import CkapipeError, DataError, LayerError, SpecError
from ckapipe.extract.layers import Recorder, default_selection, parse_selection, prepare
from ckapipe.extract.minibatches import Minibatches, rows_of
from ckapipe.extract.models import LoadedModel
from ckapipe.store import LayerInfo, LayerSpec

PROBE_BATCH = 4  # samples of the probe forward that checks the layers and finds their shapes
HALF = (torch.float16, torch.bfloat16)  # too coarse for the Grams' sums; CPUs run few of their operators


@dataclass
class FeatureSource:
    """One model's features of each minibatch, on ``device``: its forward hooks (``recorder``) and the
    recorded layers with their shapes (``infos``, in forward order), found by the probe."""

    module: nn.Module
    recorder: Recorder
    infos: dict[str, LayerInfo]
    device: torch.device

    @property
    def layers(self) -> list[str]:
        return list(self.infos)

    @property
    def layer_specs(self) -> tuple[LayerSpec, ...]:
        """What the run's key holds of each recorded layer (name, selector, reduction)."""
        return tuple(self.recorder.specs[name] for name in self.infos)

    @property
    def queued(self) -> bool:
        """Inside ``taking``: ``features`` holds what its function made of each layer's features."""
        return self.recorder.take is not None

    def hooked(self):
        """The context in which ``features`` records: the model's forward hooks registered."""
        return self.recorder.hooked()

    def features(self, inputs) -> dict[str, torch.Tensor]:
        """One forward of a minibatch's inputs moved to the device: layer name -> (m, D) features
        (or what ``taking``'s function made of them)."""
        return self.recorder.forward(to_device(inputs, self.device))

    def taking(self, take: Callable[[np.ndarray], Any]):
        """A context in which each layer's hook hands its features, as a NumPy array of a CPU tensor that
        nobody changes afterwards, to ``take`` as it records them (``features`` then holds take's results)."""
        stack = contextlib.ExitStack()
        self.recorder.take = lambda features: take(features.numpy())
        stack.callback(setattr, self.recorder, "take", None)
        return stack


def feature_source(loaded: LoadedModel, layers, reduction: str, probe, device: torch.device, label: str,
                   inputs: str, remedy: str, name_errors: bool = False) -> FeatureSource:
    """``loaded``'s model on ``device``, its layer selection checked and probed on ``probe``
    (``probe_inputs``): a one-line error names the model by ``label`` (``name_errors``: prefixed to a
    refused selection too), the ``inputs`` it ran on, and the ``remedy``."""
    module = loaded.module.to(device)
    check_devices(module, device, label)

    def probed():
        try:
            return probe_layers(module, layers, reduction, probe)
        except CkapipeError as err:
            if not name_errors:
                raise
            raise type(err)(f"model {label}: {err}") from None

    recorder, infos = runs_on(probed, label, inputs, remedy)
    return FeatureSource(module, recorder, infos, device)


def probe_inputs(feed: Minibatches, device: torch.device):
    """The first inputs of a feed, checked (dtype, device) and on the device: what a model is probed with."""
    probe = feed.probe(PROBE_BATCH)
    check_inputs(probe, feed.given)
    return to_device(probe, device)


def feature_arrays(features: dict[str, torch.Tensor], xp=np) -> dict:
    """Each layer's features as an array of ``xp``, the kernels' array module (``device_arrays``):
    CuPy's through DLPack (no copy from a CUDA tensor), else a NumPy view of a CPU tensor (a copy
    to the host for a CUDA tensor)."""
    if xp is not np:
        return {name: xp.from_dlpack(t) for name, t in features.items()}
    return {name: t.numpy() if t.device.type == "cpu" else t.cpu().numpy() for name, t in features.items()}


def device_arrays(device: torch.device):
    """The array module of the features' kernels: CuPy for a CUDA device when it is installed, else NumPy."""
    return (cupy_module() or np) if device.type == "cuda" else np


def spare_cores() -> int:
    """Cores this process may use that torch's intra-op threads leave free (for the Grams beside the forward)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(0, cores - torch.get_num_threads())


def to_device(inputs: Any, device: torch.device) -> Any:
    """Inputs (a tensor, or a dict of them as a tokenizer gives) on the device; other values as they are."""
    if isinstance(inputs, dict):
        return {k: to_device(v, device) for k, v in inputs.items()}
    return inputs.to(device, non_blocking=True) if isinstance(inputs, torch.Tensor) else inputs


def check_inputs(inputs: Any, given: str) -> None:
    """A one-line DataError for inputs no forward can use: on the meta device (no data) or in float16/bfloat16."""
    tensors = inputs.items() if isinstance(inputs, dict) else [("", inputs)]
    for key, tensor in tensors:
        if not isinstance(tensor, torch.Tensor):
            continue
        where = f"the {given}" + (f" (input {key!r})" if key else "")
        if tensor.is_meta:
            raise DataError(f"{where} is on the meta device and holds no data: give tensors with their values")
        if tensor.dtype in HALF:
            raise DataError(f"{where} holds {str(tensor.dtype).removeprefix('torch.')} inputs: ckapipe runs models "
                            f"in float32; give the inputs as float32 (inputs.float())")


def check_devices(module: nn.Module, device: torch.device, model: str) -> None:
    """A one-line SpecError for a tensor kept as a plain attribute of a submodule (not a parameter or
    buffer) on another device than the model's: ``module.to(device)`` does not move it."""
    for path, sub in module.named_modules():
        for attr, value in vars(sub).items():
            if isinstance(value, torch.Tensor) and not attr.startswith("_") and not same_device(value.device, device):
                where = f"{path}.{attr}" if path else attr
                raise SpecError(f"model {model} keeps tensor {where} on {value.device}, not on the model's device "
                                f"{device} (module.to does not move plain attributes): register it as a buffer "
                                f"(self.register_buffer({attr!r}, tensor))")


def same_device(a: torch.device, b: torch.device) -> bool:
    """``cuda`` and ``cuda:0`` are one device when 0 is the current one."""
    return a.type == b.type and device_index(a) == device_index(b)


def device_index(device: torch.device) -> int | None:
    return torch.cuda.current_device() if device.type == "cuda" and device.index is None else device.index


def probe_layers(module: nn.Module, layers, reduction: str, probe_inputs):
    """The selection checked against the module, then one probe forward: a Recorder and the layers' shapes.

    The probe's few samples run on one CPU thread: they gain nothing from more, and on a busy
    machine every operator's thread barrier costs more than the operator.
    """
    selections = parse_selection([layers] if isinstance(layers, str) else layers, reduction) if layers else default_selection(reduction)
    with torch_threads(1):
        return prepare(module, selections, probe_inputs, rows_of(probe_inputs))


@contextmanager
def torch_threads(n: int):
    """torch's CPU threads set to n inside the block (torch's setting is the process's), restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def runs_on(forward, model: str, inputs: str, remedy: str):
    """``forward()``, with a model that fails on the inputs given reported in one line."""
    try:
        return forward()
    except CkapipeError:
        raise
    except (RuntimeError, ValueError, TypeError, IndexError, NotImplementedError) as err:
        first = (str(err).strip().splitlines() or [""])[0][:200]
        raise LayerError(f"model {model} cannot run on {inputs} ({type(err).__name__}: {first}): {remedy}") from None
