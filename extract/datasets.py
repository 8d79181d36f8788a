"""Dataset sources: a spec string in, batches of model inputs by index out.

Spellings (``?key=value`` adds options)::

    digits[?size=32]                     scikit-learn's bundled digits (offline default), (1, 8, 8)
    cifar10:/data/cifar?split=test       a torchvision dataset by (lower-case) name and root, extra 'vision'
    imagefolder:/data/imagenet/val       torchvision ImageFolder, extra 'vision'
    hf:/data/saved?split=test            a Hugging Face dataset saved with save_to_disk, extra 'hf'
    inputs.npy  |  npy:inputs.npy        an array of inputs (memory-mapped)
    inputs.zarr |  zarr:store?array=x    a Zarr array of inputs
    package.module:callable?kw=v         a map-style dataset, tensor or array returned by a callable

Image options: ``size=S`` (resize the short side and center-crop to S),
``normalize=imagenet``, ``transform=package.module:callable``. The transform
is recorded as a string in the run spec, so a changed preprocessing is a new
run. Items that are ``(input, label)`` pairs give their input; dict items (Hugging
Face) give their tensor columns (``columns=a,b`` to choose), padded per batch.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import torch
import zarr

from ckapipe.errors import MissingExtra, SpecError
from ckapipe.extract.specs import call_factory, import_object, int_param, looks_importable, module_exists, require, split_spec
from ckapipe.errors import suggest
from ckapipe.extract.zoo import digits_tensors

SOURCES = ("digits", "imagefolder", "hf", "npy", "zarr")
LABEL_COLUMNS = ("label", "labels", "target", "targets", "idx", "id")
IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


@dataclass
class LoadedDataset:
    """Inputs by index: an in-memory tensor/array, or a map-style dataset read through a DataLoader."""

    spec: str
    transform: str
    length: int
    take: Callable[[np.ndarray], Any] | None = None  # fast path: indices -> batch
    items: Any = None  # map-style dataset: dataset[i] -> item
    columns: tuple[str, ...] | None = field(default=None)

    def __len__(self) -> int:
        return self.length

    def batches(self, index_lists: Iterable[np.ndarray], workers: int = 0) -> Iterator[Any]:
        """Model inputs for each list of dataset indices, in order; workers read ahead."""
        if self.take is not None:
            for idx in index_lists:
                yield self.take(np.asarray(idx))
            return
        loader = torch.utils.data.DataLoader(
            self.items, batch_sampler=[list(map(int, idx)) for idx in index_lists], num_workers=workers,
            collate_fn=_Collate(self.columns),
        )
        yield from loader


def load_dataset(spec: str) -> LoadedDataset:
    """Resolve a dataset spec (see the module docstring)."""
    head, params = split_spec(spec)
    source, sep, rest = head.partition(":")
    if head == "digits":
        return _digits(spec, params)
    if sep and source in SOURCES[1:]:
        return {"imagefolder": _imagefolder, "hf": _hf_disk, "npy": _npy, "zarr": _zarr}[source](spec, rest, params)
    path = Path(head).expanduser()
    if path.suffix == ".npy":
        return _npy(spec, head, params)
    if path.suffix == ".zarr" or (path.is_dir() and (path / "zarr.json").exists()):
        return _zarr(spec, head, params)
    if looks_importable(head) and (module_exists(source) or "." in source):
        return _callable(spec, head, params)
    if sep:
        return _torchvision(spec, source, rest, params)
    raise SpecError(
        f"unknown dataset spec {spec!r}{suggest(head, list(SOURCES))}: use digits, NAME:ROOT (torchvision), "
        "imagefolder:DIR, hf:DIR, FILE.npy, STORE.zarr or package.module:callable"
    )


# --------------------------------------------------------------------------- sources


def _digits(spec: str, params: dict) -> LoadedDataset:
    x, _ = digits_tensors()
    transform = "scale(1/16)"
    if "size" in params:
        size = positive_size(params, f"dataset {spec}")
        x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
        transform += f"|resize({size},bilinear)"
    return LoadedDataset(spec, transform, len(x), take=lambda idx: x[torch.from_numpy(idx)])


def _npy(spec: str, path: str, params: dict) -> LoadedDataset:
    file = Path(path).expanduser()
    if not file.is_file():
        raise SpecError(f"input array {file} does not exist")
    try:  # never unpickled: an object array could run code as it loads
        array = np.load(file, mmap_mode="r", allow_pickle=False)
    except ValueError as err:
        why = "holds Python objects, which ckapipe does not unpickle" if "pickle" in str(err) or "object" in str(err) \
            else f"is not a readable .npy file ({str(err).splitlines()[0][:120]})"
        raise SpecError(f"input array {file} {why}: save a numeric array") from None
    except OSError as err:
        raise SpecError(f"cannot read input array {file}: {err.strerror or err}") from None
    return _array(spec, array)


def _zarr(spec: str, path: str, params: dict) -> LoadedDataset:
    try:
        node = zarr.open(Path(path).expanduser(), mode="r")
    except Exception as err:  # noqa: BLE001 - zarr raises several types here
        raise SpecError(f"cannot open Zarr inputs {path} ({type(err).__name__})") from None
    if isinstance(node, zarr.Group):
        name = params.get("array")
        names = list(node.array_keys())
        if name not in names:
            raise SpecError(f"Zarr group {path} has no array {name!r}{suggest(str(name), names)}: pick one with ?array=NAME")
        node = node[name]
    return _array(spec, node, oindex=True)


def _array(spec: str, array, oindex: bool = False) -> LoadedDataset:
    check_inputs(spec, array)

    def take(idx: np.ndarray) -> torch.Tensor:
        order = np.argsort(idx)  # sorted reads are sequential on disk
        rows = array.oindex[idx[order]] if oindex else array[idx[order]]
        out = np.empty_like(rows)
        out[order] = rows
        return torch.from_numpy(np.ascontiguousarray(out))

    return LoadedDataset(spec, "none", int(array.shape[0]), take=take)


def _callable(spec: str, head: str, params: dict) -> LoadedDataset:
    made = call_factory(import_object(head, "dataset callable"), params, f"dataset callable {head}")
    if not in_memory_kind(made):
        raise SpecError(f"dataset callable {head} returned a {type(made).__name__}, not a map-style dataset or array")
    return in_memory(spec, made)


def in_memory(spec: str, data) -> LoadedDataset:
    """Inputs held by a Python object: a NumPy array or tensor (row i = sample i), or a map-style dataset."""
    if isinstance(data, np.ndarray):
        return _array(spec, data)
    if isinstance(data, torch.Tensor):
        return LoadedDataset(spec, "callable", len(data), take=lambda idx: data[torch.from_numpy(idx)])
    return LoadedDataset(spec, "callable", len(data), items=data)


def in_memory_kind(data) -> str | None:
    """"array", "tensor" or "dataset" (map-style: ``len`` and ``[i]``) for data ``in_memory`` takes, else None."""
    if isinstance(data, np.ndarray):
        return "array"
    if isinstance(data, torch.Tensor):
        return "tensor"
    if hasattr(data, "__getitem__") and hasattr(data, "__len__") and not isinstance(data, (str, bytes, dict)):
        return "dataset"
    return None


def _torchvision(spec: str, name: str, root: str, params: dict) -> LoadedDataset:
    try:
        tv = require("torchvision", "vision")
    except MissingExtra:
        raise MissingExtra(
            f"dataset {name!r} is not a built-in source ({', '.join(SOURCES)}); torchvision datasets (NAME:ROOT) "
            "need the 'vision' extra: pip install 'ckapipe[vision]'"
        ) from None
    classes = {c.lower(): c for c in tv.datasets.__all__}
    if name.lower() not in classes:
        raise SpecError(f"unknown dataset {name!r}{suggest(name.lower(), list(classes) + list(SOURCES))} (torchvision names, digits, imagefolder, hf, npy, zarr)")
    cls = getattr(tv.datasets, classes[name.lower()])
    transform, described = image_transform(params)
    kwargs = {"root": root, "transform": transform, "download": bool(params.pop("download", False))}
    split = params.pop("split", None)
    accepted = inspect.signature(cls).parameters
    if split is not None:
        if "split" in accepted:
            kwargs["split"] = split
        elif "train" in accepted:
            kwargs["train"] = split == "train"
    kwargs.update({k: v for k, v in params.items() if k in accepted})
    try:
        dataset = cls(**{k: v for k, v in kwargs.items() if k in accepted or k == "root"})
    except (RuntimeError, FileNotFoundError, OSError) as err:
        raise SpecError(f"cannot read dataset {name} at {root} ({err}): fix the root or add ?download=True") from None
    return LoadedDataset(spec, described, len(dataset), items=dataset)


def _imagefolder(spec: str, root: str, params: dict) -> LoadedDataset:
    tv = require("torchvision", "vision")
    transform, described = image_transform(params)
    try:
        dataset = tv.datasets.ImageFolder(root, transform=transform)
    except (FileNotFoundError, OSError) as err:
        raise SpecError(f"cannot read image folder {root}: {err}") from None
    return LoadedDataset(spec, described, len(dataset), items=dataset)


def _hf_disk(spec: str, path: str, params: dict) -> LoadedDataset:
    datasets = require("datasets", "hf")
    try:
        data = datasets.load_from_disk(str(Path(path).expanduser()))
    except (FileNotFoundError, OSError) as err:
        raise SpecError(f"cannot load Hugging Face dataset from {path} ({type(err).__name__}): save it with save_to_disk") from None
    if isinstance(data, datasets.DatasetDict):
        split = params.get("split")
        if split not in data:
            raise SpecError(f"Hugging Face dataset {path} has splits {', '.join(data)}: choose one with ?split=NAME")
        data = data[split]
    columns = tuple(str(params["columns"]).split(",")) if "columns" in params else None
    transform, described = image_transform(params) if any(k in params for k in ("size", "normalize", "transform")) else (None, "none")
    return LoadedDataset(spec, described, len(data), items=_HFItems(data, transform), columns=columns)


# --------------------------------------------------------------------------- helpers


def check_inputs(spec: str, array) -> None:
    """Inputs are a numeric array with a leading sample dimension and at least one sample."""
    shape, dtype = tuple(array.shape), np.dtype(array.dtype)
    if not shape:
        raise SpecError(f"dataset {spec} is a 0-d array (a single number): inputs need a leading sample dimension")
    if shape[0] == 0:
        raise SpecError(f"dataset {spec} holds no samples (shape {shape})")
    if dtype.kind not in "biuf":
        raise SpecError(f"dataset {spec} holds {dtype} values: inputs must be numbers (bool, int or float)")


def positive_size(params: dict, what: str) -> int:
    """The ``size`` option as a positive integer, or a one-line error naming ``what``."""
    size = int_param(params, "size", 0, what)
    if size < 1:
        raise SpecError(f"{what}: size={size} is not a positive number of pixels")
    return size


def image_transform(params: dict):
    """A torchvision transform from ``size``/``normalize``/``transform`` options and its description."""
    if "transform" in params:
        name = str(params["transform"])
        return import_object(name, "transform"), f"callable({name})"
    tv = require("torchvision", "vision")
    T = tv.transforms
    steps, described = [], []
    if "size" in params:
        size = positive_size(params, "dataset image option")
        steps += [T.Resize(size), T.CenterCrop(size)]
        described += [f"resize({size})", f"center_crop({size})"]
    steps.append(T.ToTensor())
    described.append("to_tensor")
    if params.get("normalize") == "imagenet":
        steps.append(T.Normalize(*IMAGENET))
        described.append("normalize(imagenet)")
    return T.Compose(steps), "|".join(described)


class _HFItems:
    """Rows of a Hugging Face dataset with PIL images turned into tensors."""

    def __init__(self, data, transform):
        self.data, self.transform = data, transform

    def __len__(self):
        return len(self.data)

    def __getitem__(self, i):
        row = self.data[int(i)]
        if self.transform is not None:
            row = {k: self.transform(v) if hasattr(v, "convert") else v for k, v in row.items()}
        return row


class _Collate:
    """Items -> one batch of model inputs: the first element of tuples, tensor columns of dicts."""

    def __init__(self, columns):
        self.columns = columns

    def __call__(self, items):
        first = items[0]
        if isinstance(first, (tuple, list)):
            return torch.utils.data.default_collate([item[0] for item in items])
        if isinstance(first, dict):
            keys = self.columns or [k for k, v in first.items() if k not in LABEL_COLUMNS and _tensorlike(v)]
            return {k: _stack_padded([torch.as_tensor(item[k]) for item in items]) for k in keys}
        return torch.utils.data.default_collate(items)


def _tensorlike(value) -> bool:
    return isinstance(value, (torch.Tensor, np.ndarray, list)) or hasattr(value, "shape")


def _stack_padded(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Stack, padding 1-D sequences of unequal length with zeros (attention masks pad with 0 too)."""
    if len({t.shape for t in tensors}) == 1:
        return torch.stack(tensors)
    return torch.nn.utils.rnn.pad_sequence(tensors, batch_first=True, padding_value=0)
