"""Run stores written directly from NumPy arrays, for the analysis and store tests (no torch)."""

from __future__ import annotations

import numpy as np

from ckapipe.store import COMPLETE, LayerInfo, LayerSpec, RunSpec, create_run


def make_run(cache, name, layers, m, sample_ids=None, complete=True, chunks=None, grams_only=False, seed=0,
             dtype="float32"):
    """A run store named ``name`` holding ``layers`` ({layer: (N, D) array}) in chunks of m.

    ``chunks`` limits the chunks written (the others stay missing); ``grams_only``
    writes no activations but fills the Gram cache at m from the given arrays.
    """
    from ckapipe.kernels import minibatch_grams

    n = len(next(iter(layers.values())))
    ids = np.arange(n) if sample_ids is None else np.asarray(sample_ids)
    spec = RunSpec(
        model=f"zoo:{name}", weights_hash=f"w{seed}-{name}", dataset="synthetic", transform="none",
        order_seed=seed, batch_size=m, layers=tuple(LayerSpec(layer) for layer in layers), name=name, dtype=dtype,
    )
    info = {layer: LayerInfo(x.shape[1], (x.shape[1],)) for layer, x in layers.items()}
    run = create_run(cache, spec, ids, info, grams_only=grams_only)
    n_chunks = -(-n // m)
    todo = range(n_chunks) if chunks is None else chunks
    grams = run.grams(m, create=True) if grams_only else None
    if grams is not None:
        grams.attrs["run_key"] = run.key
    for k in todo:
        rows = run.chunk_slice(k)
        if grams is not None and rows.stop - rows.start == m:
            parts = [minibatch_grams(layers[layer][rows]) for layer in grams.layers]
            grams.write([k], np.stack([c for c, _ in parts])[None], np.stack([a for _, a in parts])[None])
        run.write_chunk(k, {layer: x[rows] for layer, x in layers.items()})
    if complete and chunks is None:
        run.refresh_status()
        assert run.status == COMPLETE
    return run


def random_layers(rng, n, dims, offset=0.0):
    """{"l0": (n, d0), ...} float32 features: a random linear stack with some shared signal."""
    base = rng.standard_normal((n, 16))
    out = {}
    for i, d in enumerate(dims):
        w = rng.standard_normal((16, d))
        x = base @ w + 0.5 * rng.standard_normal((n, d)) + offset
        out[f"l{i}"] = x.astype(np.float32)
    return out
