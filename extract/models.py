"""Model sources: a spec string in, an eval-mode ``nn.Module`` and its weights hash out.

Spellings (``?key=value`` adds keyword arguments)::

    zoo:cnn2?seed=0                      a network of the default study (extract.zoo)
    torchvision:resnet18[?weights=none]  torchvision.models, extra 'vision'
    timm:vit_tiny_patch16_224            timm, extra 'vision'
    hf:bert-base-uncased                 transformers AutoModel, extra 'hf'
    package.module:factory?depth=3       any callable returning an nn.Module
    path/to/weights.pt?arch=SPEC         a state_dict (weights_only=True) loaded into SPEC
    path/to/model.pt                     a TorchScript archive

``weights=none`` (or ``random_init=True`` from ``--random-init``) builds a
pretrained-hub architecture with random weights drawn from ``init_seed``
(default 0), so the run key stays stable. The weights hash (sha256 over every
state_dict tensor's name, dtype, shape and bytes) and the code hash (the module
tree's classes, settings, tensors' shapes and ``forward`` sources; see
``code_hash``) go into the run key: a cache keyed by names alone would silently
serve stale activations.
"""

from __future__ import annotations

import hashlib
import inspect
import os
import pickle
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ckapipe.errors import SpecError, suggest
from ckapipe.extract import zoo
from ckapipe.extract.specs import (
    call_factory, check_params, import_object, int_param, looks_importable, module_exists, require, split_spec,
    takes_keyword,
)

HUBS = ("zoo", "torchvision", "timm", "hf")
RANDOM = ("none", "random", None, False)


@dataclass
class LoadedModel:
    """A model ready for extraction and the facts that go into the run key."""

    module: nn.Module
    spec: str
    weights_hash: str
    code_hash: str = ""
    unhashed: tuple[str, ...] = ()  # code the code hash could not see (no Python source): a reuse is unproven


def load_model(spec: str, *, cache: str | os.PathLike = "cache", random_init: bool = False) -> LoadedModel:
    """Resolve a model spec (see the module docstring) to an eval-mode module."""
    head, params = split_spec(spec)
    if random_init:
        params["weights"] = "none"
    seed = int_param(params, "init_seed", 0, f"model {spec}")
    params.pop("init_seed", None)
    with torch.random.fork_rng(devices=[]):  # random init is reproducible; the caller's RNG is left alone
        torch.manual_seed(seed)
        module = _build(head, params, cache, random_init)
    if not isinstance(module, nn.Module):
        raise SpecError(f"model {spec!r} gave a {type(module).__name__}, not a torch.nn.Module")
    module.eval()
    recorded = spec if not random_init or "weights=none" in spec else _with_param(spec, "weights", "none")
    return LoadedModel(module, recorded, weights_hash(module), *code_hash(module))


def _build(head: str, params: dict, cache, random_init: bool = False) -> nn.Module:
    source, _, name = head.partition(":")
    if source in HUBS:
        if not name:
            raise SpecError(f"model spec {head!r} names no model: write {source}:NAME")
        build = {"zoo": _zoo, "torchvision": _torchvision, "timm": _timm, "hf": _hf}[source]
        try:
            return build(name, params, cache)
        except TypeError as err:  # a keyword the hub's constructor does not take
            raise SpecError(f"model {head}: {_first_line(err)} (check its ?key=value options)") from None
    path = Path(head).expanduser()
    if path.is_file():
        return _checkpoint(path, params, cache)
    if looks_importable(head) and (module_exists(source) or "." in source):  # a dotted module: say it is missing
        factory = import_object(head, "model factory")
        if random_init and not takes_keyword(factory, "weights"):
            raise SpecError(
                f"--random-init: model factory {head} has no 'weights' parameter to ask it for random weights: "
                f"leave --random-init out (the factory decides its weights, drawn from ?init_seed=S)"
            )
        return call_factory(factory, params, f"model factory {head}")
    if path.suffix in (".pt", ".pth", ".ckpt", ".bin", ".safetensors"):
        raise SpecError(f"model checkpoint {head} does not exist")
    raise SpecError(
        f"unknown model spec {head!r}{suggest(source, list(HUBS))}: use zoo:NAME, torchvision:NAME, timm:NAME, "
        "hf:NAME, package.module:factory or a checkpoint file"
    )


def _zoo(name: str, params: dict, cache) -> nn.Module:
    zoo.build(name)  # unknown names fail before any training
    check_params(lambda seed=0, weights="trained", steps=None, teacher=None: None, params, f"model zoo:{name}")
    if params.get("weights", "trained") in RANDOM:
        return zoo.build(name)
    steps = int_param(params, "steps", 0, f"model zoo:{name}") if "steps" in params else None
    return zoo.load(name, int_param(params, "seed", 0, f"model zoo:{name}"), cache, steps=steps,
                    teacher=params.get("teacher"))


def _torchvision(name: str, params: dict, cache) -> nn.Module:
    tv = require("torchvision", "vision")
    available = tv.models.list_models()
    if name not in available:
        raise SpecError(f"torchvision has no model {name!r}{suggest(name, available)}")
    weights = params.pop("weights", "DEFAULT")
    weights = None if weights in RANDOM else weights
    try:
        return tv.models.get_model(name, weights=weights, **params)
    except (OSError, RuntimeError, ValueError) as err:
        if weights is None:
            raise
        raise _no_weights(f"torchvision:{name}", err) from None


def _timm(name: str, params: dict, cache) -> nn.Module:
    timm = require("timm", "vision")
    if not timm.is_model(name):
        raise SpecError(f"timm has no model {name!r}{suggest(name, timm.list_models())}")
    pretrained = params.pop("weights", "pretrained") not in RANDOM
    try:
        return timm.create_model(name, pretrained=pretrained, **params)
    except (OSError, RuntimeError, ValueError) as err:
        if not pretrained:
            raise
        raise _no_weights(f"timm:{name}", err) from None


def _hf(name: str, params: dict, cache) -> nn.Module:
    transformers = require("transformers", "hf")
    random = params.pop("weights", "pretrained") in RANDOM
    try:
        if random:
            config = transformers.AutoConfig.from_pretrained(name, **params)
            return transformers.AutoModel.from_config(config)
        return transformers.AutoModel.from_pretrained(name, **params)
    except OSError as err:
        raise _no_weights(f"hf:{name}", err, config_needed=random) from None


def _no_weights(model: str, err: Exception, config_needed: bool = False) -> SpecError:
    what = "its configuration" if config_needed else "its weights"
    hint = "" if config_needed else f", or pass random weights with {model}?weights=none (--random-init)"
    return SpecError(
        f"cannot load {what} for {model} ({type(err).__name__}): download them once with network access "
        f"(they land in the library's usual cache){hint}"
    )


def _checkpoint(path: Path, params: dict, cache) -> nn.Module:
    """A TorchScript archive, or a state_dict loaded into ``?arch=SPEC``.

    Weights are read with ``weights_only=True``: a checkpoint holding other
    Python objects is refused, never unpickled (unpickling can run any code).
    """
    kind = _archive_kind(path)
    if kind == "torchscript":
        with warnings.catch_warnings():  # TorchScript is deprecated in torch, still what many checkpoints are
            warnings.simplefilter("ignore", DeprecationWarning)
            try:
                return TorchScriptModel(torch.jit.load(str(path), map_location="cpu"))
            except Exception as err:  # noqa: BLE001 - torch raises many types for bad archives
                raise SpecError(f"cannot load TorchScript archive {path} ({type(err).__name__}: {_first_line(err)})") from None
    if kind == "zip":
        raise SpecError(f"model file {path} is a zip archive but neither a TorchScript archive nor a torch.save checkpoint")
    arch = params.pop("arch", None)
    if not arch:
        raise SpecError(f"checkpoint {path} holds weights, not a model: name its architecture with {path}?arch=SPEC")
    try:
        with warnings.catch_warnings():  # torch warns about a bare pickle's protocol before refusing it: one line only
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise SpecError(
            f"checkpoint {path} holds Python objects besides tensors, which ckapipe does not unpickle "
            f"(unpickling can run any code): save the model's state_dict, or a TorchScript archive, instead"
        ) from None
    except Exception as err:  # noqa: BLE001 - torch raises many types for bad files
        raise SpecError(f"cannot read checkpoint {path} as weights ({type(err).__name__}: {_first_line(err)})") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    arch_head, arch_params = split_spec(str(arch))
    arch_params.update(params)
    if arch_head.partition(":")[0] in HUBS:
        arch_params["weights"] = "none"  # the checkpoint brings the weights
    module = _build(arch_head, arch_params, cache)
    try:
        module.load_state_dict(state)
    except RuntimeError as err:
        first = str(err).strip().splitlines()[0:2]
        raise SpecError(f"checkpoint {path} does not fit architecture {arch}: {' '.join(first)}") from None
    return module


class TorchScriptModel(nn.Module):
    """A TorchScript archive behind one hookable layer, ``output``.

    Compiled graphs do not run Python hooks, so their inner modules cannot be
    recorded; only what the whole model returns can.
    """

    def __init__(self, script: torch.jit.ScriptModule):
        super().__init__()
        self.script = script
        self.output = nn.Identity()

    def forward(self, *args, **kwargs):
        return self.output(self.script(*args, **kwargs))


def _archive_kind(path: Path) -> str:
    """"torchscript", "torch" (a torch.save zip), "zip" (any other zip) or "file" (not a zip)."""
    try:
        if not zipfile.is_zipfile(path):
            return "file"
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (OSError, zipfile.BadZipFile):
        return "file"
    if any(n.endswith("constants.pkl") or "/code/" in n for n in names):
        return "torchscript"
    return "torch" if any(n.endswith("data.pkl") for n in names) else "zip"


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [""])[0][:200]


def _with_param(spec: str, key: str, value: str) -> str:
    return f"{spec}{'&' if '?' in spec else '?'}{key}={value}"


def weights_hash(module: nn.Module) -> str:
    """sha256 over the state_dict: every tensor's name, dtype, shape and bytes, in name order."""
    digest = hashlib.sha256()
    state = module.state_dict()
    for name in sorted(state):
        if isinstance(state[name], torch.Tensor):
            update_tensor(digest, name, state[name])
    return digest.hexdigest()


def update_tensor(digest, name: str, tensor: torch.Tensor) -> None:
    """One tensor into a sha256: its name, dtype, shape and bytes (none for a meta tensor, which has none)."""
    digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|{tensor.device.type == 'meta'}|".encode())
    if tensor.numel() and not tensor.is_meta:
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())


PLAIN = (bool, int, float, str, bytes, type(None))


def code_hash(module: nn.Module) -> tuple[str, tuple[str, ...]]:
    """(sha256 of what, besides the weights, decides the activations; what it could not see).

    Per submodule, in tree order: its name, class (module and qualname), ``extra_repr()``, the
    names, shapes and dtypes of its own parameters and buffers, its plain attributes (numbers,
    strings, and their tuples), tensors kept as attributes (with their bytes), and the source of its class's ``forward`` (inspect.getsource; a
    TorchScript module's compiled code). A ``forward`` without Python source (a C extension, code
    typed into a REPL) is named in the second element: the key cannot prove a reuse safe.
    """
    digest, unhashed, sources = hashlib.sha256(), [], {}
    for name, sub in module.named_modules(remove_duplicate=False):
        digest.update(submodule_facts(name, sub).encode())
        for attr, value in sorted(vars(sub).items()):
            if isinstance(value, torch.Tensor) and not attr.startswith("_"):  # not a buffer, yet forward may read it
                update_tensor(digest, f"{name}.{attr}", value)
        code = forward_code(sub, sources)
        if code is None:
            unhashed.append(f"{qualname(type(sub))}.forward")
        digest.update((code or "").encode())
    return digest.hexdigest(), tuple(dict.fromkeys(unhashed))


def submodule_facts(name: str, sub: nn.Module) -> str:
    """One submodule's name, class, settings, own tensors' names, shapes and dtypes, and plain attributes."""
    tensors = [(n, tuple(t.shape), str(t.dtype)) for n, t in
               [*sub.named_parameters(recurse=False), *sub.named_buffers(recurse=False)] if t is not None]
    plain = sorted((k, repr(v)) for k, v in vars(sub).items() if not k.startswith("_") and is_plain(v))
    kind = getattr(sub, "original_name", "") if isinstance(sub, torch.jit.ScriptModule) else qualname(type(sub))
    return f"{name}|{kind}|{_extra_repr(sub)}|{tensors}|{plain}\n"


def forward_code(sub: nn.Module, sources: dict) -> str | None:
    """The source of ``type(sub).forward`` (cached per class in ``sources``), a TorchScript module's code,
    or None when there is none to read."""
    if isinstance(sub, torch.jit.ScriptModule):
        try:
            return sub.code
        except (AttributeError, RuntimeError):  # a compiled container without forward: no code to run
            return ""
    cls = type(sub)
    if cls not in sources:
        try:
            sources[cls] = inspect.getsource(cls.forward)
        except (OSError, TypeError):  # no source file: a C extension, a REPL, a frozen app
            sources[cls] = None
    return sources[cls]


def is_plain(value) -> bool:
    return isinstance(value, PLAIN) or (isinstance(value, tuple) and all(isinstance(v, PLAIN) for v in value))


def qualname(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _extra_repr(sub: nn.Module) -> str:
    try:
        return sub.extra_repr()
    except Exception:  # noqa: BLE001 - a user's extra_repr may fail; the rest of the facts still count
        return "?"
