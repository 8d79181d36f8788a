"""``compare``: minibatch CKA of models on data in one pass, nothing written that is not needed::

    from ckapipe import compare
    res = compare(model_a, model_b, loader)                        # nn.Modules or model specs
    res = compare({"r18": m1, "r34": m2, "r50": m3}, loader, layers="layer*.?")   # every pair, one pass

Each minibatch is loaded once and given to every model in turn. The extraction stage's forward
hooks (``Recorder``) hand a model's features of the minibatch to the analysis kernels where they
are (a CUDA tensor reaches CuPy through DLPack without a copy, a CPU tensor is a NumPy view); the
U-centered Gram triangle of every layer is computed there (``kernels.u_centered_triangle_from_features``) and the
features are dropped. One product of the stacked triangles of every layer of every model gives the
minibatch's HSIC_1 matrix (``kernels.hsic1_matrix``), kept per minibatch. Memory: one model's
activations of one minibatch, whatever N; the numbers: those of ``extract`` + ``analyze`` of the
same models and samples (docs/design.md, "The analysis algorithm").

With ``cache=DIR`` the same pass leaves a grams-only run per model (``keep_activations``: a full
run) under the run's usual key; a later compare, analyze or extract including that model reuses it
instead of running the model.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from ckapipe import store
from ckapipe.analyze.grams import RunSource, create_gram_caches, plan_source, run_triangles
from ckapipe.analyze.results import Results, RunEntry, check_out, write_results
from ckapipe.blas import single_threaded_blas
from ckapipe.devices import cupy_module, resolve_device
from ckapipe.errors import ActivationError, CkapipeError, DataError, StoreError
from ckapipe.extract.layers import Recorder
from ckapipe.extract.minibatches import Minibatches, PairedMinibatches, minibatches, paired
from ckapipe.extract.models import LoadedModel
from ckapipe.extract.runner import (
    PROBE_BATCH, check_devices, check_inputs, check_order_seed, probe_layers, resolve_model, run_spec,
    runs_on, to_device, warn_unproven_reuse,
)
from ckapipe.extract.writer import ChunkWriter
from ckapipe.kernels import PRODUCTS, hsic1_matrix, minibatch_grams, to_host, u_centered_triangle_from_packed, u_centered_triangle_from_features
from ckapipe.locks import writer_lock
from ckapipe.progress import Progress


ALL = "every model"  # the name of data that every model reads


@dataclass
class Member:
    """One model of a compare and where its Gram triangles of each minibatch come from: its forward
    pass (``recorder``), or a cached run (``source``)."""

    label: str
    named: bool  # by the user: the name of its run in the cache too
    loaded: LoadedModel
    recorder: Recorder
    infos: dict[str, store.LayerInfo]  # recorded layers, in forward order, with their shapes
    run: store.Run | None = None  # its run in the cache, when there is one
    source: RunSource | None = None  # a complete cached run: read, the model is not run
    writer: ChunkWriter | None = field(default=None, repr=False)  # filling its run as the pass goes
    keep_activations: bool = False
    feed: str = ALL  # the name of the data it reads in the compare's PairedMinibatches

    @property
    def layers(self) -> list[str]:
        return list(self.infos)

    @property
    def runs_model(self) -> bool:
        return self.source is None


def compare(
    *models_and_data,
    data=None,
    layers: str | Sequence[str] | Mapping[str, Any] | None = None,
    batch_size: int | None = None,
    cache: str | os.PathLike | None = None,
    keep_activations: bool = False,
    data_name: str | None = None,
    order_seed: int | None = 0,
    limit: int | None = None,
    reduction: str = "flatten",
    device: str = "auto",
    precision: str = "float64",
    out: str | os.PathLike | None = None,
    overwrite: bool = False,
    random_init: bool = False,
    workers: int = 0,
    progress: bool = True,
) -> Results:
    """Minibatch CKA of every pair of layers of the models (each with itself too), in one pass over the data.

    ``compare(model_a, model_b, data)`` or ``compare({"name": model, ...}, data)``: models are
    ``nn.Module``s or model specs (``zoo:cnn3?seed=0``, ``torchvision:resnet18``, ...), named by the
    dict's keys, else by spec or class name. ``data``: a DataLoader (its batches are the minibatches
    unless ``batch_size`` is given), a map-style Dataset, a tensor or array of inputs, or a dataset
    spec (see ckapipe.extract.minibatches); a last minibatch shorter than m is dropped, with a note.
    One data per model (``compare(a, b, loader_a, loader_b)``, ``data=[...]`` in the models' order or
    ``data={name: ...}``): the same samples in another form, paired by position, checked to be as many
    and to carry the same labels or ids (extract.minibatches.paired).
    ``layers``: a selection for every model (``"layer*.?"``; ``"*"`` every leaf module; see
    ckapipe.extract.layers) or one per name (a dict); default every leaf module of each model (``"*"``, as torch-cka).

    ``cache``: also leave a grams-only run per model in this cache (``keep_activations``: a full run),
    and reuse complete runs found there instead of running their models. Data given as an object is
    identified by ``data_name`` (one per data) or else by the sha256 of its minibatches (one extra pass
    that loads them, made only with a cache). ``precision="float32"`` multiplies the centered features in float32
    (faster on CPUs, about 1e-9 off in CKA; never cached). ``out``: write the results store there.
    """
    named_models, named, data = split_arguments(models_and_data, data)
    check_order_seed(order_seed)
    data = per_model(data, named_models)
    data_names = names_of_data(data_name, data)
    if precision not in PRODUCTS:
        raise CkapipeError(f"precision {precision!r} is not one of {', '.join(PRODUCTS)}")
    if cache is not None and precision != "float64":
        raise CkapipeError("a cache holds float64 Grams only: compare with precision='float64' to cache, or without a cache")
    if keep_activations and cache is None:
        raise CkapipeError("keep_activations keeps them in a cache: give cache=DIR")
    if out is not None:
        check_out(out, overwrite)
    if cache is not None:
        store.ensure_cache(cache)
    feed = paired({who: minibatches(one, batch_size, order_seed=order_seed, limit=limit, name=data_names[who],
                                    workers=workers) for who, one in data.items()})
    selections = layer_selections(layers, list(named_models))
    torch_device = torch.device(resolve_device(device, "torch"))
    probes = {who: checked_probe(one, torch_device) for who, one in feed.feeds.items()}
    members = [
        member(label, named, model, selections.get(label), reduction, probes[who], torch_device, cache, random_init,
               feed.feeds[who].given, who)
        for (label, model), who in zip(named_models.items(), feed_of(data, named_models))
    ]
    if progress:
        for note in feed.notes:
            print(f"ckapipe: note: {note}", file=sys.stderr)
    with contextlib.ExitStack() as locks:
        if cache is not None:
            check_distinct_runs(members, feed)
            attach_runs(members, feed, cache, keep_activations, locks)
        hsic = one_pass(members, feed, torch_device, precision, progress)
    results = Results(
        [entry(m) for m in members], hsic, np.arange(len(hsic)),
        {"runs": [{"name": entry(m).name, "key": entry(m).key} for m in members], "m": feed.m,
         "pairing": "sample_ids", "minibatches": list(range(len(hsic))), "precision": precision, "data": feed.given},
        list(feed.notes),
    )
    results.cka()  # warns once about constant layers (CKA undefined, NaN)
    results.interval()  # the bootstrap intervals, as analyze: warns once when too few minibatches enter
    if out is not None:
        write_results(results, out, overwrite=overwrite)
    return results


# --------------------------------------------------------------------------- arguments


def split_arguments(args: tuple, data) -> tuple[dict[str, Any], bool, Any]:
    """(models by name, whether the user named them, data) from ``(model, ..., data)``,
    ``(model, ..., data_a, data_b, ...)``, ``({name: model}, data...)`` or ``data=``.

    Trailing arguments that cannot be models (a DataLoader, a Dataset, a tensor, an array) are the
    data; several of them are one per model, in the models' order. Else the last argument is the data.
    """
    args = list(args)
    if data is None:
        trailing = trailing_data(args)
        if len(args) - len(trailing) < 1 or len(args) < 2:
            raise CkapipeError("compare needs models and data: compare(model_a, model_b, data), "
                               "compare(model_a, model_b, data_a, data_b) or compare({name: model}, data)")
        if len(trailing) > 1:
            data, args = trailing, args[:-len(trailing)]
        else:
            data = args.pop()
    named = len(args) == 1 and isinstance(args[0], Mapping)
    if named:
        models = dict(args[0])
        for name in models:
            if not isinstance(name, str) or not name:
                raise CkapipeError(f"model names must be non-empty strings, not {name!r}")
    else:
        models = model_names(args)
    if not models:
        raise CkapipeError("compare needs at least one model")
    for name, model in models.items():
        if not isinstance(model, (str, nn.Module)):
            raise CkapipeError(f"model {name!r} is a {type(model).__name__}: give an nn.Module or a model spec")
    return models, named, data


def trailing_data(args: list) -> list:
    """The arguments at the end that cannot be models or a dict of them: data objects."""
    trailing = []
    for arg in reversed(args):
        if isinstance(arg, (str, nn.Module, Mapping)):
            break
        trailing.insert(0, arg)
    return trailing


def per_model(data, models: Mapping[str, Any]) -> dict[str, Any]:
    """{model name: its data} from data for every model, a list (one per model, in order) or a dict by
    model name; one data for every model is {ALL: data}."""
    if isinstance(data, Mapping):
        if set(data) != set(models):
            raise CkapipeError(f"data is given for {', '.join(map(str, data))}: give it for every model and no "
                               f"other ({', '.join(models)})")
        return {name: data[name] for name in models}
    if isinstance(data, list):  # not a tuple: an (inputs, labels) pair is one data
        if len(data) != len(models):
            raise CkapipeError(f"compare got {len(models)} models and {len(data)} data: give one data for every "
                               f"model, or one per model in the models' order")
        return dict(zip(models, data))
    return {ALL: data}


def names_of_data(data_name, data: dict[str, Any]) -> dict[str, str | None]:
    """The name of each data (``data_name``: one for one data, a list or dict of them for one per model)."""
    if data_name is None:
        return dict.fromkeys(data)
    if (ALL in data) != isinstance(data_name, str):
        raise CkapipeError("give data_name as one name for one data, or one name per model for one data per model")
    return {ALL: data_name} if ALL in data else per_model(data_name, data)


def feed_of(data: dict[str, Any], models: Mapping[str, Any]) -> list[str]:
    """The name of the data each model reads (its own, or the one for all)."""
    return [name if name in data else ALL for name in models]


def model_names(models: list) -> dict[str, Any]:
    """A name per model: its spec's readable form (``cnn3-seed0``) or its class name; repeats numbered -1, -2, ..."""
    names = [store.spec_slug(m) if isinstance(m, str) else type(m).__name__ for m in models]
    counts = {name: names.count(name) for name in names}
    seen: dict[str, int] = {}
    out = {}
    for name, model in zip(names, models):
        if counts[name] > 1:
            seen[name] = seen.get(name, 0) + 1
            name = f"{name}-{seen[name]}"
        out[name] = model
    return out


def layer_selections(layers, names: list[str]) -> dict[str, Any]:
    """The layer selection of each model: one for all, or one per name (a dict naming only known models)."""
    if isinstance(layers, Mapping):
        unknown = [name for name in layers if name not in names]
        if unknown:
            raise CkapipeError(f"layers are given for {', '.join(map(repr, unknown))}, which name no model "
                               f"(the models are {', '.join(names)})")
        return dict(layers)
    return {name: layers for name in names}


# --------------------------------------------------------------------------- models and runs


def member(label, named, model, layers, reduction, probe_inputs, device, cache, random_init, given,
           feed=ALL) -> Member:
    """A model ready to hand its features to the kernels: loaded, on the device, its layers checked and probed."""
    loaded = resolve_model(model, cache if cache is not None else store.default_cache(), random_init,
                           hash_weights=cache is not None, label=label)
    module = loaded.module.to(device)
    check_devices(module, device, label)

    def probe():
        try:
            return probe_layers(module, layers, reduction, probe_inputs)
        except CkapipeError as err:
            raise type(err)(f"model {label}: {err}") from None

    recorder, infos = runs_on(probe, label, f"the inputs of the {given}", "check that the model and the data fit")
    return Member(label, named, loaded, recorder, infos, feed=feed)


def checked_probe(feed: Minibatches, device):
    """The first inputs of a feed, checked (dtype, device) and on the device: what each model is probed with."""
    probe = feed.probe(PROBE_BATCH)
    check_inputs(probe, feed.given)
    return to_device(probe, device)


def check_distinct_runs(members: list[Member], feeds: PairedMinibatches) -> None:
    """With a cache each name is one run: two names of one model (the same object, spec, or weights and code)
    would write one store twice; a one-line error names them."""
    seen: dict[str, str] = {}
    for m in members:
        key = run_spec(m.loaded, feeds.feeds[m.feed], tuple(m.recorder.specs[name] for name in m.layers)).key
        if key in seen:
            raise CkapipeError(f"models {seen[key]!r} and {m.label!r} are the same model (same weights, code and "
                               f"layers): with a cache each name is one run; compare it once")
        seen[key] = m.label


def attach_runs(members: list[Member], feeds: PairedMinibatches, cache, keep_activations: bool, locks) -> None:
    """Each model's run in the cache: a complete one to read instead of running the model, or a new
    one (grams-only, or full with ``keep_activations``) that the pass fills, under a writer lock."""
    for m in members:
        feed = feeds.feeds[m.feed]
        layer_specs = tuple(m.recorder.specs[name] for name in m.layers)
        full = run_spec(m.loaded, feed, layer_specs, name=m.label if m.named else None)
        cached = reusable_run(cache, [full, dataclasses.replace(full, grams_only=True)], feed.m)
        if cached is not None:
            m.run, m.source = cached
            warn_unproven_reuse(m.loaded, m.run)
            continue
        spec = full if keep_activations else dataclasses.replace(full, grams_only=True)
        m.run = store.create_run(cache, spec, feed.sample_ids, m.infos)
        warn_unproven_reuse(m.loaded, m.run)
        locks.enter_context(writer_lock(m.run.path, range(m.run.n_chunks)))
        if "data" not in m.run.meta:
            m.run.set_meta(data=feed.provenance())
        if m.run.status == store.FAILED:
            m.run.set_meta(status=store.IN_PROGRESS, error=None)
        m.keep_activations = keep_activations
    reused = [m for m in members if m.source is not None]
    for m, source in zip(reused, create_gram_caches([m.source for m in reused], feeds.m)):
        m.source = source


def reusable_run(cache, specs: list[store.RunSpec], m: int):
    """(run, source) of the first complete run in the cache with one of these keys whose Grams at m can be
    had (cached, or from its activations); None when there is none."""
    for spec in specs:
        path = store.store_with_key(cache, spec.key)
        if path is None:
            continue
        run = store.open_run(path)
        if not run.done().all():
            continue
        try:
            return run, plan_source(run, m, use_gram_cache=True)
        except StoreError:
            continue
    return None


# --------------------------------------------------------------------------- the pass


def one_pass(members: list[Member], feed: PairedMinibatches, device, precision: str, progress: bool) -> np.ndarray:
    """(n_minibatches, L, L) HSIC_1 of every pair of layers of every model, minibatch by minibatch."""
    running = [m for m in members if m.runs_model]
    n, size = feed.n_chunks, sum(len(m.layers) for m in members)
    hsic = np.empty((n, size, size))
    xp = device_arrays(device)
    bar = Progress(n * feed.m, "compare", "samples", enabled=progress)
    try:
        for m in running:
            if m.run is not None:
                m.writer = ChunkWriter(m.run, dtype="float32", grams=m.run.grams(feed.m, create=True))
        batches = feed.batches(verify=True) if running else ((k, None) for k in range(n))
        with contextlib.ExitStack() as hooks:
            if xp is not np:  # CuPy's kernels on the features' GPU
                hooks.enter_context(xp.cuda.Device(device.index or 0))
            grams = hooks.enter_context(layer_grams(xp, precision))
            for m in running:
                hooks.enter_context(m.recorder.hooked())
            hooks.enter_context(queued_grams(running, grams))
            for k, inputs in batches:
                inputs = to_device(inputs, device) if running else None
                parts = [member_triangles(m, k, inputs and inputs[m.feed], feed.m, xp, grams) for m in members]
                hsic[k] = to_host(hsic1_matrix(xp.concatenate(parts)))
                if not np.isfinite(hsic[k]).all():
                    raise ActivationError(not_finite(members, parts, k))
                bar.update(feed.m)
        for m in running:
            if m.writer is not None:
                m.writer.close()
                m.run.refresh_status()
    except BaseException as err:
        for m in running:
            if m.writer is not None:
                m.writer.abort()
                if isinstance(err, (ActivationError, DataError)):
                    m.run.set_meta(status=store.FAILED, error=str(err))
        raise
    finally:
        bar.close()
    return hsic


@contextlib.contextmanager
def layer_grams(xp, precision: str):
    """The Gram work of a pass (``GramPool``): each layer's ``kernel`` (default: its U-centered Gram triangle;
    ``kernels.minibatch_grams`` for a run's Gram cache) of a list of features, or of features queued as they arrive.

    On the GPU the kernels are queued on the stream one layer after another. On the CPU, where cores are
    left beside torch's intra-op threads, a layer's Gram is queued on one of them as soon as its hook has
    copied the features, so the products run while the forward goes on. Where torch's threads take every
    core, the Grams wait for the end of each forward and then take torch's cores: a worker beside the forward
    deschedules one of torch's threads, and every operator of the forward waits at its barrier for it
    (docs/benchmarks.md, "compare against the forward passes"). Each worker has one BLAS thread: a
    multi-threaded BLAS call waits for all its threads at every step.
    """
    if xp is not np:
        yield GramPool(precision, None, queues=False)
        return
    spare = spare_cores()
    with single_threaded_blas(True), ThreadPoolExecutor(spare or torch.get_num_threads(), "ckapipe-gram") as pool:
        yield GramPool(precision, pool, queues=spare > 0)


def spare_cores() -> int:
    """Cores this process may use that torch's intra-op threads leave free."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(0, cores - torch.get_num_threads())


@dataclass
class GramPool:
    """Where a pass's Gram kernels run: on this thread (a GPU's stream), or on a pool of CPU workers."""

    precision: str
    pool: ThreadPoolExecutor | None
    queues: bool  # the hooks queue each layer's Gram on the pool as the forward goes on

    def __call__(self, arrays: list, kernel=u_centered_triangle_from_features) -> list:
        """``kernel`` of each array (m × D): the largest first, so that the workers' shares are even."""
        if self.pool is None:
            return [kernel(x, self.precision) for x in arrays]
        order = sorted(range(len(arrays)), key=lambda i: -arrays[i].size)
        done = dict(zip(order, self.pool.map(lambda i: kernel(arrays[i], self.precision), order)))
        return [done[i] for i in range(len(arrays))]

    def queue(self, features: torch.Tensor) -> Future:
        """The U-centered Gram triangle of one layer's features (a CPU tensor the caller no longer changes), on a worker."""
        return self.pool.submit(u_centered_triangle_from_features, features.numpy(), self.precision)


def queued_grams(running: list[Member], grams: GramPool):
    """A context in which the hooks of the models whose features go nowhere else queue their Grams as they record."""
    stack = contextlib.ExitStack()
    if grams.queues:
        for m in running:
            if m.writer is None:
                m.recorder.take = grams.queue
                stack.callback(setattr, m.recorder, "take", None)
    return stack


def member_triangles(m: Member, k: int, inputs, batch: int, xp, grams: GramPool):
    """(layers, m(m-1)/2) U-centered Gram triangles of one model's layers for minibatch k, on the device:
    read from its cached run, or from its forward pass (queued by its hooks, or handed to its run's writer)."""
    if not m.runs_model:
        return run_triangles(m.source, [k], batch, xp)[0]
    features = m.recorder.forward(inputs)
    if m.recorder.take is not None:
        return xp.stack([features[name].result() for name in m.layers])
    arrays = feature_arrays(features, xp)
    layers = [arrays[name] for name in m.layers]
    del arrays
    if m.writer is None:
        return xp.stack(grams(layers))
    rows = grams(layers, minibatch_grams)  # what the run's Gram cache keeps: the U-centered triangles follow from it
    centered = xp.stack([c for c, _ in rows])
    host = [(to_host(c), to_host(a)) for c, a in rows]
    m.writer.submit(k, features if m.keep_activations else {}, dict(zip(m.layers, host)))
    return u_centered_triangle_from_packed(centered)


def feature_arrays(features: dict[str, torch.Tensor], xp=np) -> dict:
    """Each layer's features as an array of ``xp``, the kernels' array module (``device_arrays``):
    CuPy's through DLPack (no copy from a CUDA tensor), else a NumPy view of a CPU tensor (a copy
    to the host for a CUDA tensor)."""
    if xp is not np:
        return {name: xp.from_dlpack(t) for name, t in features.items()}
    return {name: t.numpy() if t.device.type == "cpu" else t.cpu().numpy() for name, t in features.items()}


def device_arrays(device: torch.device):
    """The array module of the Gram triangles: CuPy for a CUDA device when it is installed, else NumPy."""
    return (cupy_module() or np) if device.type == "cuda" else np


def not_finite(members: list[Member], parts, k: int) -> str:
    """The one-line message naming the model and layers whose minibatch k is not finite."""
    for m, tri in zip(members, parts):
        bad = [name for name, row in zip(m.layers, to_host(tri)) if not np.isfinite(row).all()]
        if bad:
            return f"model {m.label}: layer(s) {', '.join(bad)} have NaN or Inf activations in minibatch {k}"
    return f"the HSIC of minibatch {k} is not finite"


def entry(m: Member) -> RunEntry:
    if m.run is None:
        return RunEntry(m.label, m.label, "", tuple(m.layers), modules=modules_of(m))
    return RunEntry(m.run.name, m.label, m.run.key, tuple(m.layers), str(m.run.path), modules_of(m))


def modules_of(m: Member) -> tuple[str, ...]:
    """Each recorded layer's module type, from the probe."""
    return tuple(m.infos[name].module for name in m.layers)
