"""Layer selection, forward hooks and per-layer reductions.

A layer is a module's qualified name (``layer1.0.conv1``). A module called
once per forward is recorded under its plain name; a module called several
times (torchvision's BasicBlock reuses one ``relu``) is recorded per call,
``relu#0``, ``relu#1``, ..., never overwritten.

A selection item is ``PATTERN[@SELECT][:REDUCTION]``:

- PATTERN: an exact name, a glob (``layer*.?``; ``*`` stays within one dotted part,
  ``**`` crosses dots), ``*`` alone for every leaf module (torch-cka's "all layers"), or
  ``name#i`` for one call;
- SELECT: which tensor of a tuple/list/dict output (an index or key); the
  first tensor, depth first, by default; the choice is recorded in the run;
- REDUCTION: ``flatten`` (default, as in the CKA papers), ``mean`` (spatial mean
  of (B, C, ...) maps, token mean of (B, T, D) sequences honouring the model's
  ``attention_mask``), or ``cls`` (token 0 of (B, T, D) sequences).

Names and patterns are checked against the model's modules before any
forward pass; a typo gets the nearest real names.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import nn

from ckapipe import globs
from ckapipe.errors import LayerError, suggest
from ckapipe.store import LayerInfo, LayerSpec

REDUCTIONS = ("flatten", "mean", "cls")
EVERY_LEAF = "*"  # the pattern of every leaf module


@dataclass(frozen=True)
class Selection:
    """One item of ``--layers``: a pattern with its output selector and reduction."""

    pattern: str
    select: str | None
    reduction: str

    @property
    def base(self) -> str:
        return self.pattern.split("#")[0]

    @property
    def call(self) -> int | None:
        _, sep, call = self.pattern.partition("#")
        return int(call) if sep and call.isdigit() else None


def parse_selection(items: Sequence[str], reduction: str = "flatten") -> list[Selection]:
    """``["layer*.?:mean", "encoder@0"]`` -> Selections; items may also be comma-separated."""
    selections = []
    for item in (part.strip() for raw in items for part in raw.split(",")):
        if not item:
            continue
        head, _, red = item.partition(":")
        pattern, _, select = head.partition("@")
        red = red or reduction
        if red not in REDUCTIONS:
            raise LayerError(f"unknown reduction {red!r} for layer {pattern!r}{suggest(red, REDUCTIONS)} (choose {', '.join(REDUCTIONS)})")
        selections.append(Selection(pattern, select or None, red))
    return selections


def hookable(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of every module whose calls run Python hooks, in definition order.

    The root is excluded (its output is the model's output, usually also a
    named child's), and so are TorchScript modules: compiled graphs run no hooks.
    """
    return [(name, m) for name, m in model.named_modules() if name and not isinstance(m, torch.jit.ScriptModule)]


def module_names(model: nn.Module) -> list[str]:
    """Every hookable module's qualified name, in definition order."""
    return [name for name, _ in hookable(model)]


def default_selection(reduction: str = "flatten") -> list[Selection]:
    """Every leaf module (``"*"``), as torch-cka and pytorch-cka compare when not told which layers:
    what a user coming from them means by "its layers"."""
    return [Selection(EVERY_LEAF, None, reduction)]


def match_modules(model: nn.Module, selections: Sequence[Selection]) -> dict[str, list[Selection]]:
    """Module name -> the selections that chose it; a pattern matching nothing is an error.

    Runs without a forward pass, so a typo is caught before any compute.
    """
    names = module_names(model)
    chosen: dict[str, list[Selection]] = {}
    for sel in selections:
        hits = pattern_hits(model, sel.base)
        if not hits:
            raise LayerError(f"no layer {sel.pattern!r} in the model{suggest(sel.base, names)} (list them with: ckapipe layers MODEL)")
        for name in hits:
            chosen.setdefault(name, []).append(sel)
    return chosen


def glob_match(pattern: str, name: str) -> bool:
    """Shell glob over dotted names: ``*`` and ``?`` stay within one name part, ``**`` crosses dots.

    So ``layer*.?`` means the blocks ``layer1.0 .. layer4.1``, not ``layer1.0.downsample.0``.
    """
    return globs.glob_match(pattern, name, globs.LAYER_SEPARATORS)


def leaf_names(model: nn.Module) -> list[str]:
    """Every hookable module without children (a Linear, a ReLU; not a block): what ``"*"`` selects."""
    return [name for name, m in hookable(model) if next(m.children(), None) is None]


def pattern_hits(model: nn.Module, pattern: str) -> list[str]:
    """The module names a pattern selects: ``*`` every leaf module (as torch-cka's "all layers"), a glob
    the names it matches part by part, any other pattern the module of that exact name."""
    if pattern == EVERY_LEAF:
        return leaf_names(model)
    names = module_names(model)
    return [n for n in names if glob_match(pattern, n)] if globs.is_glob(pattern) else [n for n in names if n == pattern]


# --------------------------------------------------------------------------- outputs


def pick_tensor(output: Any, select: str | None) -> tuple[torch.Tensor | None, str | None]:
    """The tensor chosen by ``select`` from a module output, and the selector that finds it again."""
    if select is None:
        return _first_tensor(output, ())
    node = output
    for part in select.split("."):
        if isinstance(node, dict):
            node = node.get(part)
        elif isinstance(node, (tuple, list)) and part.lstrip("-").isdigit() and -len(node) <= int(part) < len(node):
            node = node[int(part)]
        else:
            return None, select
    return (node, select) if isinstance(node, torch.Tensor) else (None, select)


def _first_tensor(node: Any, path: tuple[str, ...]) -> tuple[torch.Tensor | None, str | None]:
    if isinstance(node, torch.Tensor):
        return node, ".".join(path) or None
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, (tuple, list)) else ()
    for key, child in items:
        found, where = _first_tensor(child, path + (str(key),))
        if found is not None:
            return found, where
    return None, None


def reduce(x: torch.Tensor, reduction: str, mask: torch.Tensor | None = None) -> torch.Tensor:
    """(B, ...) output -> (B, D) features, a fresh tensor (never a view of the output)."""
    batch = x.shape[0]
    if reduction == "flatten" or x.dim() == 2 and reduction == "mean":
        out = x.reshape(batch, -1)
    elif reduction == "mean" and x.dim() == 3:
        out = _token_mean(x, mask)
    elif reduction == "mean":
        out = x.float().mean(dim=tuple(range(2, x.dim())))
    elif reduction == "cls":
        if x.dim() != 3:
            raise LayerError(f"reduction cls needs token outputs (B, T, D), got shape {tuple(x.shape)}")
        out = x[:, 0]
    else:
        raise LayerError(f"unknown reduction {reduction!r}")
    return out.to(torch.float64 if x.dtype == torch.float64 else torch.float32, copy=True)


def _token_mean(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean over tokens, padding excluded when the attention mask fits the sequence."""
    if mask is None or mask.shape[:2] != x.shape[:2]:
        return x.float().mean(dim=1)
    weights = mask.to(device=x.device, dtype=torch.float32).unsqueeze(-1)
    return (x.float() * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1)


# --------------------------------------------------------------------------- recording


class Recorder:
    """Forward hooks that capture, reduce and clone the chosen outputs of one forward.

    Cloning matters: an in-place op later in the forward (``relu(inplace=True)``,
    ``out += identity``) would otherwise change what was recorded.
    """

    def __init__(self, model: nn.Module, modules: dict[str, list[Selection]] | None = None):
        self.model = model
        self.modules = modules  # None: observe every module (layer listing)
        self.specs: dict[str, LayerSpec] = {}  # recorded name -> spec (after resolve)
        self.calls: dict[str, int] = {}
        self.outputs: dict[str, torch.Tensor] = {}
        self.raw: dict[str, Any] = {}  # probe only: recorded name -> (output, module)
        self.mask: torch.Tensor | None = None
        self.calls_per_forward: dict[str, int] = {}
        self.probing = True
        self.take: Callable[[torch.Tensor], Any] | None = None  # given each layer's features as its hook records them

    @contextmanager
    def hooked(self) -> Iterator["Recorder"]:
        handles = [
            module.register_forward_hook(self._hook(name))
            for name, module in hookable(self.model)
            if self.modules is None or name in self.modules
        ]
        try:
            yield self
        finally:
            for handle in handles:
                handle.remove()

    def forward(self, inputs: Any) -> dict[str, torch.Tensor]:
        """Run the model on one batch; return recorded name -> (B, D) features."""
        self.calls, self.outputs, self.raw = {}, {}, {}
        self.mask = inputs.get("attention_mask") if isinstance(inputs, dict) else None
        with torch.inference_mode():
            self.model(**inputs) if isinstance(inputs, dict) else self.model(inputs)
        if not self.probing and len(self.outputs) != len(self.specs):
            missing = ", ".join(name for name in self.specs if name not in self.outputs)
            raise LayerError(f"layer(s) {missing} did not run in this minibatch: the model's control flow depends on its input")
        outputs, self.outputs = self.outputs, {}  # the caller's alone: dropped when the caller drops them
        return outputs

    def _hook(self, module_name: str):
        def hook(module, args, output):
            call = self.calls.get(module_name, 0)
            self.calls[module_name] = call + 1
            if self.probing:
                self.raw[f"{module_name}#{call}"] = (output, type(module).__name__)
                return
            name = self._recorded_name(module_name, call)
            spec = self.specs.get(name)
            if spec is not None:
                if name in self.outputs:
                    raise LayerError(f"layer {name!r} ran more often in this minibatch than in the probe: the model's control flow depends on its input")
                tensor, _ = pick_tensor(output, spec.select)
                features = reduce(tensor, spec.reduction, self.mask)
                self.outputs[name] = features if self.take is None else self.take(features)

        return hook

    def _recorded_name(self, module_name: str, call: int) -> str:
        return f"{module_name}#{call}" if self.calls_per_forward.get(module_name, 1) > 1 else module_name

    # ---- the probe forward
    def probe(self, inputs: Any) -> None:
        """One observing forward: which modules run how often, and what they return."""
        self.probing = True
        self.forward(inputs)
        self.calls_per_forward = dict(self.calls)
        self.probing = False

    def resolve(self, batch: int) -> dict[str, LayerInfo]:
        """Recorded names with their specs and shapes, in forward order, after a probe.

        Raises for a selected layer that never ran, a call index beyond the
        calls made, an output that holds no tensor, or one without a batch dimension.
        """
        infos: dict[str, LayerInfo] = {}
        self.chosen: dict[str, tuple] = {}
        for key, (output, kind) in self.raw.items():
            module_name, call = key.rsplit("#", 1)
            name = self._recorded_name(module_name, int(call))
            for sel in self.modules.get(module_name, ()):
                if sel.call is not None and sel.call != int(call):
                    continue
                if name in infos:
                    if (sel.select, sel.reduction) != self.chosen[name]:
                        raise LayerError(f"layer {name!r} is selected twice, with different selectors or reductions: keep one")
                    continue
                self.chosen[name] = (sel.select, sel.reduction)
                tensor, where = pick_tensor(output, sel.select)
                if tensor is None:
                    what = f"no tensor at selector {sel.select!r}" if sel.select else "no tensor"
                    raise LayerError(f"layer {name!r} ({kind}) returns {what} (output is {describe(output)}): choose another layer or a selector with {sel.base}@KEY")
                if tensor.dim() == 0 or tensor.shape[0] != batch:
                    raise LayerError(f"layer {name!r} ({kind}) output {tuple(tensor.shape)} has no leading batch dimension of {batch}: choose another layer")
                features = reduce(tensor, sel.reduction, self.mask)
                self.specs[name] = LayerSpec(name=name, reduction=sel.reduction, select=where)
                infos[name] = LayerInfo(dim=int(features.shape[1]), output_shape=tuple(tensor.shape[1:]), module=kind)
        for module_name, sels in self.modules.items():
            calls = self.calls_per_forward.get(module_name, 0)
            for sel in sels:
                if calls == 0:
                    raise LayerError(f"layer {module_name!r} is never called in the forward pass: choose another layer")
                if sel.call is not None and sel.call >= calls:
                    raise LayerError(f"layer {sel.pattern!r}: {module_name} is called {calls} time(s) per forward (use #0..#{calls - 1})")
        return infos


def describe(output: Any) -> str:
    """A short type/shape description of a module output, for listings and errors."""
    if isinstance(output, torch.Tensor):
        return "x".join(map(str, output.shape[1:])) or "scalar"
    if isinstance(output, dict):
        return "{" + ", ".join(f"{k}: {describe(v)}" for k, v in list(output.items())[:4]) + "}"
    if isinstance(output, (tuple, list)):
        return "(" + ", ".join(describe(v) for v in output[:4]) + (", ..." if len(output) > 4 else "") + ")"
    return type(output).__name__


def observe(model: nn.Module, inputs: Any) -> list[tuple[str, str, str]]:
    """(recorded name, module type, per-sample output shape) of every module call, in forward order."""
    recorder = Recorder(model)
    with recorder.hooked():
        recorder.probe(inputs)
    rows = []
    for key, (output, kind) in recorder.raw.items():
        module_name, call = key.rsplit("#", 1)
        rows.append((recorder._recorded_name(module_name, int(call)), kind, describe(output)))
    return rows


def selected_rows(model: nn.Module, rows: list[tuple], items: Sequence[str]) -> list[tuple]:
    """The rows of ``observe`` (recorded name first) that the selection items choose: what ``-l`` would record.

    A bad pattern is the LayerError that extracting with it would raise.
    """
    chosen = match_modules(model, parse_selection(items))
    return [row for row in rows if _chooses(chosen, row[0])]


def _chooses(chosen: dict[str, list[Selection]], recorded: str) -> bool:
    module_name, _, call = recorded.partition("#")
    return any(sel.call is None or str(sel.call) == call for sel in chosen.get(module_name, ()))


def prepare(model: nn.Module, selections: Sequence[Selection], inputs: Any, batch: int) -> tuple[Recorder, dict[str, LayerInfo]]:
    """Validate the selection (before any forward), then probe: a recorder ready to extract."""
    recorder = Recorder(model, match_modules(model, selections))
    with recorder.hooked():
        recorder.probe(inputs)
    return recorder, recorder.resolve(batch)
