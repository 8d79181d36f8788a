"""The extraction API: one model over one dataset into one run store.

``extract_run`` resolves the sources, checks the layer selection before any
forward pass, probes one small batch for shapes, and then either finds the run
complete in the cache (a cache hit: nothing is computed) or extracts the
minibatches whose completion marker is missing, in the order given by the
order seed, through background writers.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from ckapipe import store
from ckapipe.atomic import describe_os_error
from ckapipe.blas import single_threaded_blas
from ckapipe.store.integrity import compressors
from ckapipe.devices import resolve_device
from ckapipe.errors import ActivationError, CkapipeError, DataError, SpecError
from ckapipe.extract.datasets import load_dataset
from ckapipe.extract.features import HALF, FeatureSource, feature_source, probe_inputs, runs_on
from ckapipe.extract.layers import observe, selected_rows
from ckapipe.extract.minibatches import Minibatches, sample_order, settings_minibatches  # noqa: F401 - sample_order: API
from ckapipe.extract.models import LoadedModel, code_hash, load_model, weights_hash
from ckapipe.extract.writer import ChunkWriter, compute_grams, device_grams, write_grams
from ckapipe.store.locks import writer_lock
from ckapipe.progress import Progress
from ckapipe.settings import SETTING_FIELDS, RunSettings



def extract_run(model: str | nn.Module, dataset, layers: Sequence[str] | str | None = None, *,
                cache: str | os.PathLike, progress: bool = True, settings: RunSettings | None = None,
                **options) -> Path:
    """Extract (or resume, or find cached) one run; return the path of its store.

    ``dataset``: a dataset spec, or a DataLoader, map-style Dataset, tensor or array
    (see ckapipe.extract.minibatches). ``settings`` (a ckapipe.settings.RunSettings) and
    ``options`` (its fields as keywords, over ``settings``) say how: ``batch_size`` defaults to a
    DataLoader's, else 256; ``layers``: selection items ``PATTERN[@SELECT][:REDUCTION]`` (see
    extract.layers), default every leaf module (``"*"``); ``data_name`` names data given as an
    object, else its key holds the sha256 of its inputs (one pass over the data). ``chunks=(A, B)``
    extracts minibatches A..B-1 only (disjoint ranges may run side by side); ``share=(i, n)`` the
    i-th of n disjoint shares of the run's minibatches (a SLURM array task). ``grams`` fills the
    Gram cache for m = batch_size while the activations are in memory; ``grams_only`` keeps only
    the Grams (no activation arrays), never the default. ``checksums=False`` writes a store without
    checksums (store version 2), for the bench to measure their cost.

    Returns only when every minibatch of the range asked for is written (and its
    Grams, when asked); anything less is an error, never a partial run returned.
    """
    settings = run_settings(settings, layers, options)
    codecs = check_store_settings(settings)
    store.ensure_cache(cache)  # an unwritable cache fails before any model is loaded
    loaded = resolve_model(model, cache, settings.random_init)
    feed = settings_minibatches(dataset, settings, settings.data_name)
    device = torch.device(resolve_device(settings.device, "torch"))
    run, source = create_run_store(cache, loaded, feed, device, settings, codecs)
    warn_unproven_reuse(loaded, run)
    span = (store.share_range(*settings.share, run.n_chunks) if settings.share
            else chunk_range(settings.chunks, run.n_chunks))
    want_grams = settings.grams or settings.grams_only
    try:
        if _is_cached(run, span, want_grams):
            run.refresh_status()  # a process killed after its last marker left the status behind
            return run.path
        with writer_lock(run.path, span) as lock:
            if "data" not in run.meta:
                run.set_meta(data=feed.provenance())
            _extract_chunks(run, source, feed, span, settings.dtype, want_grams, progress, settings.writer_threads,
                            lock)
    except OSError as err:  # a full disk or a read-only store outside the chunk writes (markers, status, Grams)
        raise store.StoreError(f"cannot write run {run.name}: {describe_os_error(err)}; completed chunks are kept, "
                               f"rerun to resume") from None
    check_written(run, span, want_grams)
    return run.path


def run_settings(settings: RunSettings | None, layers, options: dict) -> RunSettings:
    """extract_run's settings: ``options`` (and ``layers``, when given) over ``settings``, checked once."""
    unknown = sorted(set(options) - set(SETTING_FIELDS))
    if unknown:
        raise TypeError(f"extract_run() got an unexpected keyword argument {unknown[0]!r}")
    if layers is not None:
        options = {**options, "layers": layers}
    return replace(settings, **options) if settings is not None else RunSettings(**options)


def check_store_settings(settings: RunSettings) -> tuple:
    """The settings the store rules on, checked before anything is loaded: the dtype a layer array
    holds, the run name (a directory), the compression; returns the compression's codecs."""
    store.check_dtype(settings.dtype)
    if settings.name is not None:
        store.check_run_name(settings.name)
    return compressors(settings.compression)


def create_run_store(cache, loaded: LoadedModel, feed: Minibatches, device: torch.device, settings: RunSettings,
                     codecs: tuple) -> tuple[store.Run, FeatureSource]:
    """The model's feature source on ``device`` (inputs, devices and layers checked by one probe forward),
    then the run's store, made or found in ``cache``: (run, its feature source)."""
    source = feature_source(loaded, settings.layers, settings.reduction, probe_inputs(feed, device), device,
                            loaded.spec, f"the inputs of {feed.given}", "check that the model and dataset fit")
    spec = run_spec(loaded, feed, source.layer_specs, dtype=settings.dtype, grams_only=settings.grams_only,
                    name=settings.name)
    run = store.create_run(cache, spec, feed.sample_ids, source.infos, compressors=codecs, checksums=settings.checksums)
    return run, source


def run_spec(loaded: LoadedModel, feed: Minibatches, layers: tuple[store.LayerSpec, ...], *, dtype: str = "float32",
             grams_only: bool = False, name: str | None = None) -> store.RunSpec:
    """The run of one model over the data: everything its key holds (the data's identity may take a pass)."""
    return store.RunSpec(
        model=loaded.spec, weights_hash=loaded.weights_hash, code_hash=loaded.code_hash, dataset=feed.identity(),
        transform=feed.transform, order_seed=feed.order_seed, batch_size=feed.m, layers=layers, dtype=dtype, limit=feed.limit,
        grams_only=grams_only, name=name,
    )


def list_layers(model: str | nn.Module, dataset: str | None = None, *, cache: str | os.PathLike = "cache",
                random_init: bool = False, with_types: bool = False, layers: Sequence[str] | None = None) -> list[tuple]:
    """(name, per-sample output shape) of every module call, in forward order; with_types adds the module type.
    ``layers``: only the calls these selection items choose (``"*"``: every leaf module).

    Inputs come from ``dataset`` (first samples); without one, digits for zoo
    networks, token ids for hf models, and 3 × 224 × 224 images otherwise.
    """
    loaded = resolve_model(model, cache, random_init)
    inputs = next(load_dataset(dataset).batches([np.arange(2)])) if dataset else _example_inputs(loaded.spec)
    if dataset:
        rows = runs_on(lambda: observe(loaded.module, inputs), loaded.spec, f"dataset {dataset}'s inputs",
                       "check that the model and dataset fit")
    else:
        rows = runs_on(lambda: observe(loaded.module, inputs), loaded.spec, "example inputs (3 x 224 x 224 images)",
                       "pass --dataset to take example inputs from a dataset it takes")
    if layers:
        rows = selected_rows(loaded.module, rows, layers)
    return rows if with_types else [(name, shape) for name, _, shape in rows]


# --------------------------------------------------------------------------- steps


def check_model(module: nn.Module, model: str) -> None:
    """A one-line SpecError for weights no forward can use as ckapipe runs it: on the meta device
    (never loaded) or in float16/bfloat16 (ckapipe computes in float32 and up)."""
    for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
        if tensor.is_meta:
            raise SpecError(f"model {model} has weights on the meta device ({name}: never loaded): load them "
                            f"(module.to_empty(device='cpu'), then load_state_dict) before passing it")
        if tensor.dtype in HALF:
            raise SpecError(f"model {model} has {str(tensor.dtype).removeprefix('torch.')} weights ({name}): ckapipe "
                            f"runs models in float32; pass model.float() (the activations are stored as --dtype says)")




def check_written(run, span: range, want_grams: bool) -> None:
    """Every minibatch of ``span`` has its marker (and its Gram row, when asked), or a one-line error."""
    done = run.done()
    missing = [k for k in span if not done[k]]
    if not missing and want_grams:
        grams = run.grams(run.batch_size)
        have = grams.done() if grams is not None else np.zeros(0, dtype=bool)
        missing = [k for k in span if k < run.n_samples // run.batch_size and not have[k]]
    if missing:
        raise store.StoreError(
            f"run {run.name}: {len(missing)} minibatch(es) of {span.start}:{span.stop} were not written "
            f"(first {missing[0]}): rerun the same command to write them"
        )


def chunk_range(chunks: tuple[int, int] | None, n_chunks: int) -> range:
    """Minibatches this process extracts: all of them, or ``A:B`` clipped to the run."""
    if chunks is None:
        return range(0, n_chunks)
    start, stop = chunks
    if not 0 <= start <= stop or start > n_chunks:
        raise CkapipeError(f"--chunks {start}:{stop} is not a range within the run's {n_chunks} minibatches")
    return range(start, min(stop, n_chunks))  # may be empty: a share of a split run with nothing left


def _extract_chunks(run, source: FeatureSource, feed: Minibatches, span, dtype, want_grams, progress, threads,
                    lock) -> None:
    """Forward every missing minibatch of ``span`` and hand it to the writers."""
    if run.status == store.FAILED:
        run.set_meta(status=store.IN_PROGRESS, error=None)
    gram_cache = run.grams(run.batch_size, create=True) if want_grams else None
    done = run.done()
    if gram_cache is not None and not run.grams_only:
        have = gram_cache.done()
        _grams_from_store(run, gram_cache, [k for k in span if done[k] and k < len(have) and not have[k]])
    todo = [k for k in span if not done[k]]
    rows = sum(run.chunk_slice(k).stop - run.chunk_slice(k).start for k in todo)
    bar = Progress(rows, f"extract {run.slug}", "samples", enabled=progress)
    writer = ChunkWriter(run, dtype=dtype, grams=gram_cache, threads=threads, progress=bar, lock=lock)
    try:
        with source.hooked(), single_threaded_blas(gram_cache is not None):
            for k, inputs in feed.batches(todo, verify=True):
                features = source.features(inputs)
                writer.submit(k, features, device_grams(features, dtype) if gram_cache is not None else None)
        writer.close()
    except (ActivationError, DataError) as err:
        writer.abort()
        run.set_meta(status=store.FAILED, error=str(err))
        raise
    except BaseException:
        writer.abort()
        raise
    run.refresh_status()


def _grams_from_store(run, group, chunks: list[int]) -> None:
    """Fill Gram rows of chunks whose activations are already stored (a --grams rerun)."""
    for k in chunks:
        write_grams(group, k, compute_grams({name: run.read_chunk(name, k) for name in run.layer_names}))


def _is_cached(run, span: range, want_grams: bool) -> bool:
    """Every chunk of ``span`` complete (and its Grams, when asked): nothing to do."""
    if not run.done()[span.start:span.stop].all():
        return False
    if not want_grams:
        return True
    grams = run.grams(run.batch_size)
    if grams is None:
        return False
    return bool(grams.done()[span.start:span.stop].all())


def resolve_model(model: str | nn.Module, cache, random_init: bool = False, hash_weights: bool = True,
                  label: str | None = None) -> LoadedModel:
    """A model spec loaded (zoo weights trained into ``cache``), or an nn.Module as given, in eval mode, with its
    weights hash (an nn.Module's only when ``hash_weights``: a pass over its weights that only run keys need);
    its weights checked (``check_model``), named in a refusal by ``label`` (default: its spec)."""
    if isinstance(model, nn.Module):
        cls = type(model)
        spec = f"module:{cls.__module__}.{cls.__qualname__}"
        check_model(model, label or spec)  # before its weights are hashed: meta tensors have no bytes
        model.eval()
        if not hash_weights:
            return LoadedModel(model, spec, "")
        return LoadedModel(model, spec, weights_hash(model), *code_hash(model))
    loaded = load_model(model, cache=cache, random_init=random_init)
    check_model(loaded.module, label or loaded.spec)
    return loaded


def warn_unproven_reuse(loaded: LoadedModel, run: store.Run) -> None:
    """A warning when stored minibatches of ``run`` are reused for a model whose code the key could not see."""
    if loaded.unhashed and run.done().any():
        warnings.warn(f"run {run.name} is reused, but the cache key cannot see the code of "
                      f"{', '.join(loaded.unhashed)} (no Python source): if that code changed, delete the run",
                      stacklevel=3)


def _example_inputs(spec: str) -> Any:
    source = spec.partition(":")[0]
    if source == "zoo":
        return next(load_dataset("digits").batches([np.arange(2)]))
    if source == "hf":
        return {"input_ids": torch.ones(2, 16, dtype=torch.long), "attention_mask": torch.ones(2, 16, dtype=torch.long)}
    return torch.rand(2, 3, 224, 224)
