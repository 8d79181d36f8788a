"""Background writing of minibatch activations: the forward pass never waits for the disk.

The extraction loop hands each minibatch's features to ``ChunkWriter.submit``
and goes on with the next forward. On CUDA the features are copied into pinned
host memory asynchronously (an event marks when the copy is done); writer
threads then check the values, cast, compute Grams when asked, compress and
write the chunk, and set its completion marker last. The queue is bounded, so
a disk slower than the model applies back-pressure instead of filling memory,
and ``close`` returns only once every queued chunk is written: only an error
(``abort``, or a writer's) ever leaves queued chunks unwritten.

Grams filled here are those of the values stored (after the cast to the
store's dtype), so a float16 run's CKA does not depend on which path filled
its Gram cache.
"""

from __future__ import annotations

import errno
import queue
import threading
from dataclasses import dataclass

import numpy as np
import torch

from ckapipe.devices import cupy_module
from ckapipe.errors import ActivationError, StoreError
from ckapipe import kernels
from ckapipe.progress import Progress
from ckapipe.store import Run

FLOAT16_MAX = float(np.finfo(np.float16).max)


@dataclass
class Chunk:
    """One minibatch on its way to the store."""

    k: int
    features: dict[str, torch.Tensor]
    ready: torch.cuda.Event | None = None  # set when the device-to-host copy is done
    grams: dict | None = None  # precomputed on the device, host arrays


def to_host(features: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], torch.cuda.Event | None]:
    """Start copying device features to pinned host memory; return the host tensors and an event."""
    if not features or next(iter(features.values())).device.type != "cuda":
        return features, None
    host = {}
    for name, t in features.items():
        host[name] = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        host[name].copy_(t, non_blocking=True)
    event = torch.cuda.Event()
    event.record()
    return host, event


def check_values(array: np.ndarray, dtype: str, layer: str, k: int) -> np.ndarray:
    """The array in the store's dtype; NaN/Inf, or values beyond float16 when storing float16, raise."""
    # One reduction instead of an isfinite mask: NaN and Inf make the sum non-finite;
    # only then (or on an overflowing sum of huge finite values) look element-wise.
    if not np.isfinite(np.add.reduce(array, axis=None)) and not np.isfinite(array).all():
        raise ActivationError(f"layer {layer!r} has NaN or Inf activations in minibatch {k}: the run is marked failed")
    if dtype == "float16":
        peak = max(float(array.max()), -float(array.min())) if array.size else 0.0
        if peak > FLOAT16_MAX:
            raise ActivationError(
                f"layer {layer!r} reaches {peak:.4g} in minibatch {k}, beyond float16 (max {FLOAT16_MAX:.0f}): use --dtype float32"
            )
    return array.astype(dtype, copy=False)


class ChunkWriter:
    """Writer threads fed through a bounded queue; the first error stops them and is re-raised."""

    def __init__(self, run: Run, *, dtype: str, grams=None, threads: int = 2, depth: int = 4, progress: Progress | None = None,
                 lock=None):
        self.run, self.dtype, self.gram_cache = run, dtype, grams
        self.progress, self.lock = progress, lock  # lock: a locks.WriterLock, checked before every chunk
        self.written_bytes, self.count_lock = 0, threading.Lock()
        self.queue: queue.Queue[Chunk | None] = queue.Queue(maxsize=depth)
        self.error: BaseException | None = None
        self.n_gram_chunks = run.n_samples // run.batch_size
        self.threads = [threading.Thread(target=self._work, daemon=True, name=f"ckapipe-writer-{i}") for i in range(threads)]
        for thread in self.threads:
            thread.start()

    def submit(self, k: int, features: dict[str, torch.Tensor], grams: dict | None = None) -> None:
        """Queue minibatch k (blocks only while the queue is full); raises a writer's error."""
        self._raise_error()
        host, event = to_host(features)
        while True:
            try:
                self.queue.put(Chunk(k, host, event, grams), timeout=0.1)
                return
            except queue.Full:
                self._raise_error()

    def close(self) -> None:
        """Wait until every queued chunk is written; raise the first error."""
        self._stop()
        self._raise_error()

    def abort(self) -> None:
        """Stop without writing what is still queued (after an error in the forward loop)."""
        self.error = self.error or _Aborted()
        self._drain()
        self._stop()

    def _stop(self) -> None:
        """Queue every writer thread's stop signal behind the chunks already queued, join them,
        close the progress bar. The threads consume the queue until they meet their signal
        (skipping chunks only once an error is set), so waiting for room never loses a chunk."""
        for _ in self.threads:
            self._put_stop()
        for thread in self.threads:
            thread.join()
        if self.progress is not None:
            self.progress.close()

    # ---- threads
    def _work(self) -> None:
        while True:
            chunk = self.queue.get()
            if chunk is None:
                return
            if self.error is not None:
                continue
            try:
                self._write(chunk)
            except BaseException as err:  # noqa: BLE001 - handed to the main thread
                self.error = self.error or _explain(err, chunk.k, self.run)
                self._drain()

    def _write(self, chunk: Chunk) -> None:
        if self.lock is not None:
            self.lock.check()  # taken over by another writer: stop before touching its chunks
        if chunk.ready is not None:
            chunk.ready.synchronize()
        arrays = {name: check_values(t.numpy(), self.dtype, name, chunk.k) for name, t in chunk.features.items()}
        if self.gram_cache is not None and chunk.k < self.n_gram_chunks:
            grams = chunk.grams or compute_grams(arrays)
            for name, parts in grams.items():  # a grams-only run has no features: NaN shows in its Grams
                for part in parts:
                    check_values(part, "float64", name, chunk.k)
            write_grams(self.gram_cache, chunk.k, grams)
        self.run.write_chunk(chunk.k, arrays)
        if self.progress is not None:
            rows = next(iter(arrays.values())).shape[0] if arrays else 0
            with self.count_lock:
                self.written_bytes += sum(a.nbytes for a in arrays.values()) if not self.run.grams_only else 0
                rate = self.written_bytes / max(self.progress.elapsed(), 1e-9) / 1e6
            self.progress.update(rows, f"{rate:.1f} MB/s")

    def _put_stop(self) -> None:
        while any(thread.is_alive() for thread in self.threads):
            try:
                self.queue.put(None, timeout=0.1)
                return
            except queue.Full:
                continue

    def _drain(self) -> None:
        try:
            while True:
                item = self.queue.get_nowait()
                if item is None:  # keep stop signals for the other threads
                    self.queue.put_nowait(None)
                    return
        except queue.Empty:
            return

    def _raise_error(self) -> None:
        if self.error is not None and not isinstance(self.error, _Aborted):
            raise self.error


class _Aborted(Exception):
    pass


def compute_grams(features: dict) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The Gram cache's row of one minibatch, per layer: (upper triangle with the diagonal of the
    centred Gram, mean products), see kernels.minibatch_grams (NumPy or CuPy in, host out)."""
    return {name: tuple(kernels.to_host(part) for part in kernels.minibatch_grams(x)) for name, x in features.items()}


def device_grams(features: dict[str, torch.Tensor], dtype: str = "float32") -> dict[str, tuple[np.ndarray, np.ndarray]] | None:
    """Grams computed where the activations are, on CUDA through CuPy, of the values as stored
    (cast to ``dtype`` first, as the writer casts them); None when that is not possible."""
    if not features or next(iter(features.values())).device.type != "cuda":
        return None
    cupy = cupy_module()
    if cupy is None:
        return None
    stored = {name: t.to(getattr(torch, dtype)) for name, t in features.items()}
    return compute_grams({name: cupy.from_dlpack(t) for name, t in stored.items()})


def write_grams(cache, k: int, grams: dict[str, tuple[np.ndarray, np.ndarray]]) -> None:
    """Gram row k of every layer (a store.GramCache), then its marker."""
    centred = np.stack([grams[name][0] for name in cache.layers])[None]
    means = np.stack([grams[name][1] for name in cache.layers])[None]
    cache.write([k], centred, means)


def _explain(err: BaseException, k: int, run: Run) -> BaseException:
    """A disk error as a one-line StoreError that says the run can be resumed."""
    if isinstance(err, OSError):
        reason = "the disk is full" if err.errno == errno.ENOSPC else (err.strerror or str(err))
        return StoreError(
            f"cannot write minibatch {k} of run {run.name}: {reason}; completed chunks are kept, free space and rerun to resume"
        )
    return err
