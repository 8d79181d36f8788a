"""``compare``: minibatch CKA of models on data in one pass, nothing written that is not needed::

    from ckapipe import compare
    res = compare(model_a, model_b, loader)                        # nn.Modules or model specs
    res = compare({"r18": m1, "r34": m2, "r50": m3}, loader, layers="layer*.?")   # every pair, one pass

Each minibatch is loaded once and given to every model in turn. ``compare`` is built from the two
stages' pieces: the extraction's feature source (``ckapipe.extract.features``: hooks, device, dtype)
gives each model's features of the minibatch where they are (a CUDA tensor reaches CuPy through DLPack
without a copy, a CPU tensor is a NumPy view), and the analysis's Gram accumulator
(``ckapipe.analyze.accumulate``) makes every layer's U-centered Gram triangle there, drops the features,
and stacks the triangles of every layer of every model into the minibatch's HSIC_1 matrix, kept per
minibatch. Memory: one model's activations of one minibatch, whatever N; the numbers: those of
``extract`` + ``analyze`` of the same models and samples (docs/design.md, "The analysis algorithm").
What is left here is what is specific to running without a store: the arguments, the members, and the
one pass that wires the two pieces.

With ``cache=DIR`` the same pass leaves a grams-only run per model (``keep_activations``: a full run)
under the run's usual key; a later compare, analyze or extract including that model reuses it
instead of running the model.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from ckapipe import store
from ckapipe.analyze.accumulate import cache_rows_and_triangles, gram_pool, minibatch_hsic1, stacked_run_triangles
from ckapipe.analyze.grams import RunSource, create_gram_caches, plan_source
from ckapipe.analyze.results import Results, RunEntry, write_results
from ckapipe.devices import resolve_device
from ckapipe.errors import ActivationError, CkapipeError, DataError, StoreError
from ckapipe.extract.features import (
    FeatureSource, device_arrays, feature_arrays, feature_source, probe_inputs, spare_cores, to_device,
)
from ckapipe.extract.minibatches import PairedMinibatches, paired, settings_minibatches
from ckapipe.extract.models import LoadedModel
from ckapipe.extract.runner import resolve_model, run_spec, warn_unproven_reuse
from ckapipe.extract.writer import ChunkWriter
from ckapipe.kernels import PRODUCTS, to_host
from ckapipe.store.locks import writer_lock
from ckapipe.store.results import check_out
from ckapipe.progress import Progress
from ckapipe.settings import RunSettings


ALL = "every model"  # the name of data that every model reads


@dataclass
class Member:
    """One model of a compare and where its Gram triangles of each minibatch come from: its forward
    pass (``features``), or a cached run (``cached``)."""

    label: str
    named: bool  # by the user: the name of its run in the cache too
    loaded: LoadedModel
    features: FeatureSource  # recorded layers, in forward order, with their shapes
    run: store.Run | None = None  # its run in the cache, when there is one
    cached: RunSource | None = None  # a complete cached run: read, the model is not run
    writer: ChunkWriter | None = field(default=None, repr=False)  # filling its run as the pass goes
    keep_activations: bool = False
    feed: str = ALL  # the name of the data it reads in the compare's PairedMinibatches

    @property
    def layers(self) -> list[str]:
        return self.features.layers

    @property
    def runs_model(self) -> bool:
        return self.cached is None


def compare(*models_and_data, data=None, layers: str | Sequence[str] | Mapping[str, Any] | None = None,
            batch_size: int | None = None, cache: str | os.PathLike | None = None, keep_activations: bool = False,
            data_name: str | None = None, order_seed: int | None = 0, limit: int | None = None,
            reduction: str = "flatten", device: str = "auto", precision: str = "float64",
            out: str | os.PathLike | None = None, overwrite: bool = False, random_init: bool = False,
            workers: int = 0, progress: bool = True) -> Results:
    """Minibatch CKA of every pair of layers of the models (each with itself too), in one pass over the data.

    ``compare(model_a, model_b, data)`` or ``compare({"name": model, ...}, data)``: models are ``nn.Module``s
    or model specs (``zoo:cnn3?seed=0``, ``torchvision:resnet18``, ...), named by the dict's keys, else by spec
    or class name. ``data``: a DataLoader (its batches are the minibatches unless ``batch_size`` is given), a
    map-style Dataset, a tensor or array of inputs, or a dataset spec (ckapipe.extract.minibatches); one data
    per model (``compare(a, b, loader_a, loader_b)``, ``data=[...]`` or ``data={name: ...}``) pairs the same
    samples by position. ``layers``: one selection for every model or one per name (a dict); default every
    leaf module (``"*"``). ``cache``: leave a grams-only run per model there (``keep_activations``: a full
    run) and reuse complete runs found there; object data is named by ``data_name`` or else hashed.
    ``precision="float32"``: float32 Gram products (never cached). ``out``: write the results store there.
    docs/compare.md says every option in full.
    """
    named_models, named, data = split_arguments(models_and_data, data)
    settings = RunSettings(batch_size=batch_size, order_seed=order_seed, limit=limit, reduction=reduction,
                           device=device, random_init=random_init, workers=workers)
    data = per_model(data, named_models)
    data_names = names_of_data(data_name, data)
    check_options(precision, cache, keep_activations, out, overwrite)
    feed = paired({who: settings_minibatches(one, settings, data_names[who]) for who, one in data.items()})
    selections = layer_selections(layers, list(named_models))
    torch_device = torch.device(resolve_device(settings.device, "torch"))
    members = make_members(named_models, named, selections, feed, data, torch_device, cache, settings)
    if progress:
        for note in feed.notes:
            print(f"ckapipe: note: {note}", file=sys.stderr)
    with contextlib.ExitStack() as locks:
        if cache is not None:
            check_distinct_runs(members, feed)
            attach_runs(members, feed, cache, keep_activations, locks)
        hsic = one_pass(members, feed, torch_device, precision, progress)
    results = compare_results(members, hsic, feed, precision)
    if out is not None:
        write_results(results, out, overwrite=overwrite)
    return results


def check_options(precision: str, cache, keep_activations: bool, out, overwrite: bool) -> None:
    """One-line errors for options that do not go together, before any model is loaded; the cache made."""
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


def compare_results(members: list[Member], hsic: np.ndarray, feed: PairedMinibatches, precision: str) -> Results:
    """The results of the pass, as ``analyze`` gives them; warns once about constant layers (CKA undefined,
    NaN) and, as analyze, when too few minibatches enter the bootstrap intervals."""
    results = Results(
        [entry(m) for m in members], hsic, np.arange(len(hsic)),
        {"runs": [{"name": entry(m).name, "key": entry(m).key} for m in members], "m": feed.m,
         "pairing": "sample_ids", "minibatches": list(range(len(hsic))), "precision": precision, "data": feed.given},
        list(feed.notes),
    )
    results.cka()
    results.interval()
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


def make_members(named_models: Mapping[str, Any], named: bool, selections: dict, feed: PairedMinibatches,
                 data: dict, device, cache, settings: RunSettings) -> list[Member]:
    """Every model ready to hand its features to the Gram accumulator, each probed on its data's first inputs."""
    probes = {who: probe_inputs(one, device) for who, one in feed.feeds.items()}
    return [
        member(label, named, model, selections.get(label), settings.reduction, probes[who], device, cache,
               settings.random_init, feed.feeds[who].given, who)
        for (label, model), who in zip(named_models.items(), feed_of(data, named_models))
    ]


def member(label, named, model, layers, reduction, probe, device, cache, random_init, given, feed=ALL) -> Member:
    """A model ready to hand its features to the kernels: loaded, on the device, its layers checked and probed."""
    loaded = resolve_model(model, cache if cache is not None else store.default_cache(), random_init,
                           hash_weights=cache is not None, label=label)
    features = feature_source(loaded, layers, reduction, probe, device, label, f"the inputs of the {given}",
                              "check that the model and the data fit", name_errors=True)
    return Member(label, named, loaded, features, feed=feed)


def check_distinct_runs(members: list[Member], feeds: PairedMinibatches) -> None:
    """With a cache each name is one run: two names of one model (the same object, spec, or weights and code)
    would write one store twice; a one-line error names them."""
    seen: dict[str, str] = {}
    for m in members:
        key = run_spec(m.loaded, feeds.feeds[m.feed], m.features.layer_specs).key
        if key in seen:
            raise CkapipeError(f"models {seen[key]!r} and {m.label!r} are the same model (same weights, code and "
                               f"layers): with a cache each name is one run; compare it once")
        seen[key] = m.label


def attach_runs(members: list[Member], feeds: PairedMinibatches, cache, keep_activations: bool, locks) -> None:
    """Each model's run in the cache: a complete one to read instead of running the model, or a new
    one (grams-only, or full with ``keep_activations``) that the pass fills, under a writer lock."""
    for m in members:
        feed = feeds.feeds[m.feed]
        full = run_spec(m.loaded, feed, m.features.layer_specs, name=m.label if m.named else None)
        cached = reusable_run(cache, [full, dataclasses.replace(full, grams_only=True)], feed.m)
        if cached is not None:
            m.run, m.cached = cached
            warn_unproven_reuse(m.loaded, m.run)
            continue
        spec = full if keep_activations else dataclasses.replace(full, grams_only=True)
        m.run = store.create_run(cache, spec, feed.sample_ids, m.features.infos)
        warn_unproven_reuse(m.loaded, m.run)
        locks.enter_context(writer_lock(m.run.path, range(m.run.n_chunks)))
        if "data" not in m.run.meta:
            m.run.set_meta(data=feed.provenance())
        if m.run.status == store.FAILED:
            m.run.set_meta(status=store.IN_PROGRESS, error=None)
        m.keep_activations = keep_activations
    reused = [m for m in members if m.cached is not None]
    for m, source in zip(reused, create_gram_caches([m.cached for m in reused], feeds.m)):
        m.cached = source


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
    """(n_minibatches, L, L) HSIC_1 of every pair of layers of every model, minibatch by minibatch: the feature
    sources' forwards handing their features to the Gram accumulator."""
    running = [m for m in members if m.runs_model]
    n, size = feed.n_chunks, sum(len(m.layers) for m in members)
    hsic = np.empty((n, size, size))
    xp = device_arrays(device)
    bar = Progress(n * feed.m, "compare", "samples", enabled=progress)
    try:
        open_writers(running, feed.m)
        batches = feed.batches(verify=True) if running else ((k, None) for k in range(n))
        with forwards(running, xp, device, precision) as grams:
            for k, inputs in batches:
                inputs = to_device(inputs, device) if running else None
                parts = [member_triangles(m, k, inputs and inputs[m.feed], feed.m, xp, grams) for m in members]
                hsic[k] = minibatch_hsic1(parts, xp)
                if not np.isfinite(hsic[k]).all():
                    raise ActivationError(not_finite(members, parts, k))
                bar.update(feed.m)
        close_writers(running)
    except BaseException as err:
        abort_writers(running, err)
        raise
    finally:
        bar.close()
    return hsic


@contextlib.contextmanager
def forwards(running: list[Member], xp, device, precision: str):
    """The pass's context: CuPy's kernels on the features' GPU, the Gram pool (``gram_pool``, on the cores
    torch's threads leave free), every running model's hooks, and the hooks of the models whose features go
    nowhere else queueing their Grams as they record."""
    with contextlib.ExitStack() as stack:
        if xp is not np:
            stack.enter_context(xp.cuda.Device(device.index or 0))
        grams = stack.enter_context(gram_pool(xp, precision, spare_cores(), torch.get_num_threads()))
        for m in running:
            stack.enter_context(m.features.hooked())
        for m in running:
            if grams.queues and m.writer is None:
                stack.enter_context(m.features.taking(grams.queue))
        yield grams


def open_writers(running: list[Member], m: int) -> None:
    """A writer for each model whose run in the cache the pass fills (its Gram cache at m)."""
    for member in running:
        if member.run is not None:
            member.writer = ChunkWriter(member.run, dtype="float32", grams=member.run.grams(m, create=True))


def close_writers(running: list[Member]) -> None:
    """Wait until every run is written, then record its status."""
    for m in running:
        if m.writer is not None:
            m.writer.close()
            m.run.refresh_status()


def abort_writers(running: list[Member], err: BaseException) -> None:
    """Stop the writers; a run whose features or data failed is marked failed, with the one-line reason."""
    for m in running:
        if m.writer is not None:
            m.writer.abort()
            if isinstance(err, (ActivationError, DataError)):
                m.run.set_meta(status=store.FAILED, error=str(err))


def member_triangles(m: Member, k: int, inputs, batch: int, xp, grams):
    """(layers, m(m-1)/2) U-centered Gram triangles of one model's layers for minibatch k, on the device:
    read from its cached run, or from its forward pass (queued by its hooks, or handed to its run's writer)."""
    if not m.runs_model:
        return stacked_run_triangles([m.cached], [k], batch, xp)[0]
    features = m.features.features(inputs)
    if m.features.queued:
        return xp.stack([features[name].result() for name in m.layers])
    arrays = feature_arrays(features, xp)
    layers = [arrays[name] for name in m.layers]
    del arrays
    if m.writer is None:
        return xp.stack(grams(layers))
    host, triangles = cache_rows_and_triangles(grams, layers, xp)
    m.writer.submit(k, features if m.keep_activations else {}, dict(zip(m.layers, host)))
    return triangles


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
    return tuple(m.features.infos[name].module for name in m.layers)
