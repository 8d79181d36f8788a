"""User data as minibatches of m samples: what one extraction, or every model of one compare, reads.

``minibatches(data, m)`` takes

- a dataset spec (``digits``, ``cifar10:/data``, ``inputs.npy``, ...; see ``ckapipe.extract.datasets``);
- a map-style ``Dataset``, a tensor or a NumPy array of inputs (sample i = ``data[i]``);
- a ``DataLoader``: its batches are the minibatches (``m`` given: re-cut into m rows), in the loader's
  order, with its workers and collate; ``(input, label)`` batches give their input.

``paired({name: minibatches(...), ...})`` reads one data per model side by side (a second DataLoader
for the second model, as in torch-cka): sample i of each is one sample; they must hold as many, and
labels or ids their batches carry must agree.

Specs, datasets and arrays are visited in the permutation drawn from ``order_seed`` (docs/design.md,
"Invariants", chunk = minibatch; ``order_seed=None`` keeps their order); a DataLoader in the order it gives.

A run's key needs the identity of its data. A spec is its own. Data given as an object is named by
the user (``name``: a promise that the name always means the same inputs in the same order), or
else by the sha256 of every minibatch's inputs (dtype, shape and bytes, in stream order): one pass
that loads the data without any model, made only when a key is needed (a cache, an extraction).
A later pass over all of the data checks that it streamed the same (a shuffling loader or a random
augmentation would not).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
import torch

from ckapipe.errors import CkapipeError, DataError
from ckapipe.extract.datasets import LABEL_COLUMNS, LoadedDataset, in_memory, in_memory_kind, load_dataset
from ckapipe.kernels import check_minibatch_size
from ckapipe.settings import DEFAULT_BATCH, RunSettings, check_integers

BY_SPEC, BY_NAME, BY_HASH = "spec", "name", "sha256 of every minibatch's inputs (dtype, shape, bytes) in stream order"
STREAMED = "as streamed"  # the transform of data given as an object: whatever the object applies, inside its identity


@dataclass
class Minibatches:
    """Minibatch k holds samples ``sample_ids[k*m:(k+1)*m]``; only the last may be shorter."""

    given: str  # what the user gave, in a few words (messages, provenance)
    m: int
    sample_ids: np.ndarray  # index of every row in stream order: dataset indices, or positions in a loader's stream
    order_seed: int | None  # None: the order given
    limit: int | None  # rows kept (None: all)
    transform: str
    spec: str | None = None  # the identity when the data names itself (a spec) or the user named it
    identified_by: str = BY_HASH
    source: LoadedDataset | None = field(default=None, repr=False)  # indexable data
    loader: Any = field(default=None, repr=False)  # a DataLoader
    workers: int = 0
    notes: list[str] = field(default_factory=list)
    digest: str | None = None  # sha256 of the stream, once computed

    @property
    def n(self) -> int:
        return len(self.sample_ids)

    @property
    def n_chunks(self) -> int:
        return -(-self.n // self.m)

    def identity(self) -> str:
        """The data's part of a run key: the spec, ``name:NAME``, or ``sha256:HEX`` (one pass over the data)."""
        if self.spec is not None:
            return self.spec
        if self.digest is None:
            self.digest = stream_digest(inputs for _, inputs in self.batches())
        return self.digest

    def provenance(self) -> dict:
        """What a run records about its data: what was given and how it is identified."""
        return {"given": self.given, "identity": self.identity(), "identified_by": self.identified_by,
                "order": "the loader's" if self.loader is not None else
                f"permutation of seed {self.order_seed}" if self.order_seed is not None else "as given"}

    def probe(self, n: int) -> Any:
        """Inputs of the first ``n`` samples (fewer when the data is smaller), for a probe forward pass."""
        if self.source is not None:
            return next(self.source.batches([self.sample_ids[:n]]))
        first = next(loader_inputs(self.loader), None)
        if first is None:
            raise DataError(f"the {self.given} gives no batch")
        return take_rows(first, slice(0, n))

    def batches(self, ks: Sequence[int] | None = None, verify: bool = False,
                labels: list | None = None) -> Iterator[tuple[int, Any]]:
        """(k, inputs) of minibatches ks (sorted; default all), each loaded once.

        ``verify``: a pass over every minibatch hashes them again and raises DataError, after the
        last one, when they differ from those the identity was computed from. ``labels``: a list to
        which a loader's batches append the labels or ids they carry (``batch_labels``).
        """
        wanted = range(self.n_chunks) if ks is None else ks
        verify = verify and self.digest is not None and list(wanted) == list(range(self.n_chunks))
        digest = hashlib.sha256() if verify else None
        if self.source is not None:
            stream = zip(wanted, self.source.batches((self.sample_ids[self.rows(k)] for k in wanted), self.workers))
        else:
            stream = self._loader_batches(set(wanted), labels)
        for k, inputs in stream:
            if digest is not None:
                update_digest(digest, inputs)
            yield k, inputs
        if digest is not None and f"sha256:{digest.hexdigest()[:16]}" != self.digest:
            raise DataError(
                f"the {self.given} gave other inputs on this pass than on the pass that identified it "
                f"(a shuffling sampler or a random transform?): keep its order and inputs fixed, or give "
                f"the data a name only when it always means the same inputs"
            )

    def rows(self, k: int) -> slice:
        return slice(k * self.m, min((k + 1) * self.m, self.n))

    def _loader_batches(self, wanted: set[int], labels: list | None = None) -> Iterator[tuple[int, Any]]:
        """Minibatches of a loader in its order: every one is loaded, those wanted are given."""
        seen = 0
        for k, inputs in enumerate(rebatch(loader_inputs(self.loader, labels), self.m)):
            if k >= self.n_chunks:
                break
            want = self.rows(k).stop - self.rows(k).start
            if rows_of(inputs) < want:
                break
            seen = k + 1
            if k in wanted:
                yield k, take_rows(inputs, slice(0, want)) if rows_of(inputs) > want else inputs
        if seen < self.n_chunks:
            raise DataError(f"the {self.given} gave fewer samples than its length promised ({self.n})")


def minibatches(
    data, m: int | None = None, *, order_seed: int | None = 0, limit: int | None = None, name: str | None = None,
    drop_ragged: bool = False, workers: int = 0,
) -> Minibatches:
    """The data (see the module docstring) as minibatches of m samples.

    ``m`` defaults to a DataLoader's batch size, else DEFAULT_BATCH. ``limit`` keeps the first samples of the order;
    ``drop_ragged`` also drops a last minibatch shorter than m, with a note (minibatch CKA uses full
    minibatches only); ``name`` names data given as an object.
    """
    check_integers(batch_size=m, limit=limit, workers=workers)
    if isinstance(data, str):
        if name is not None:
            raise CkapipeError(f"a data name goes with data given as an object; the dataset spec {data!r} names itself")
        source = load_dataset(data)
        feed = _indexed(data, source, source.spec, source.transform, m, order_seed, limit, drop_ragged, workers)
        feed.identified_by = BY_SPEC
        return feed
    if isinstance(data, torch.utils.data.DataLoader):
        return _loader(data, m, limit, name, drop_ragged)
    kind = in_memory_kind(data)
    if kind is None:
        raise DataError(
            f"cannot read inputs from a {type(data).__name__}: give a DataLoader, a map-style Dataset, a tensor, "
            f"a NumPy array or a dataset spec (digits, FILE.npy, NAME:ROOT, ...)"
        )
    given = f"{kind} {type(data).__name__}" if kind == "dataset" else f"{kind} {'x'.join(map(str, data.shape))} {data.dtype}"
    feed = _indexed(given, in_memory(given, data), None, STREAMED, m, order_seed, limit, drop_ragged, workers)
    return named(feed, name)


def settings_minibatches(data, settings: RunSettings, name: str | None = None) -> Minibatches:
    """The data as the minibatches a run's settings ask for (m, order seed, limit, loader workers):
    what ``extract_run`` and ``compare`` both read."""
    return minibatches(data, settings.batch_size, order_seed=settings.order_seed, limit=settings.limit, name=name,
                       workers=settings.workers)


def named(feed: Minibatches, name: str | None) -> Minibatches:
    """The data identified by the user's name (when given) instead of by its hash."""
    if name is not None:
        feed.spec, feed.identified_by = f"name:{name}", BY_NAME
    return feed


def _indexed(given, source: LoadedDataset, spec, transform, m, order_seed, limit, drop_ragged, workers) -> Minibatches:
    m = check_minibatch_size(DEFAULT_BATCH if m is None else m)
    if limit is not None and limit >= len(source):
        limit = None  # the whole dataset: the same run as without a limit
    order = sample_order(len(source), order_seed, limit)
    notes = []
    if drop_ragged:
        order, limit, notes = _drop_ragged(given, order, m, limit)
    return Minibatches(given, m, order, order_seed, limit, transform, spec, source=source, workers=workers, notes=notes)


def _loader(loader, m, limit, name, drop_ragged) -> Minibatches:
    given = f"DataLoader over a {type(loader.dataset).__name__}"
    m = m or loader.batch_size
    if m is None:
        raise CkapipeError("the DataLoader has no batch_size: give a minibatch size (batch_size)")
    check_minibatch_size(m)
    n = loader_length(loader)
    if limit is not None and limit < 1:
        raise CkapipeError(f"--limit {limit} must be positive")
    if limit is not None and limit >= n:
        limit = None
    ids = np.arange(n if limit is None else limit)
    notes = []
    if drop_ragged:
        ids, limit, notes = _drop_ragged(given, ids, m, limit)
    return named(Minibatches(given, m, ids, None, limit, STREAMED, loader=loader, notes=notes), name)


def _drop_ragged(given: str, order: np.ndarray, m: int, limit: int | None):
    """Keep the full minibatches only: a shorter last one is dropped, and said."""
    n = len(order)
    full = n // m * m
    if full == 0:
        raise DataError(f"the {given} holds {n} samples: not one full minibatch of {m}")
    if full == n:
        return order, limit, []
    note = f"the last minibatch of the {given} holds {n - full} of {m} samples: dropped (minibatch CKA uses full minibatches)"
    return order[:full], full, [note]


def sample_order(n: int, order_seed: int | None, limit: int | None) -> np.ndarray:
    """The dataset indices in stored order: a permutation from the order seed (None: as given), cut to ``limit``."""
    order = np.arange(n) if order_seed is None else np.random.default_rng(order_seed).permutation(n)
    if limit is not None:
        if limit < 1:
            raise CkapipeError(f"--limit {limit} must be positive")
        order = order[:limit]
    return order


def loader_length(loader) -> int:
    """Samples a DataLoader gives per pass (from its sampler and batch size), or a one-line error."""
    try:
        if loader.batch_size is None:
            return sum(len(batch) for batch in loader.batch_sampler)
        n = len(loader.sampler)
        return n // loader.batch_size * loader.batch_size if loader.drop_last else n
    except TypeError:
        raise DataError("the DataLoader has no length (an IterableDataset?): give one over a map-style Dataset") from None


# --------------------------------------------------------------------------- one data per model


@dataclass
class PairedMinibatches:
    """Several feeds read side by side, sample i of each paired with sample i of the others (by
    position): one model's data each (the same samples under another transform, resolution or
    tokenizer), as torch-cka's and pytorch-cka's second DataLoader. ``feeds`` are named by whose data
    they are; minibatch k of every feed is loaded together."""

    feeds: dict[str, Minibatches]

    @property
    def first(self) -> Minibatches:
        return next(iter(self.feeds.values()))

    @property
    def m(self) -> int:
        return self.first.m

    @property
    def n_chunks(self) -> int:
        return self.first.n_chunks

    @property
    def notes(self) -> list[str]:
        return [note for feed in self.feeds.values() for note in feed.notes]

    @property
    def given(self) -> str:
        if len(self.feeds) == 1:
            return self.first.given
        return "; ".join(f"{who}: {feed.given}" for who, feed in self.feeds.items())

    def batches(self, verify: bool = False) -> Iterator[tuple[int, dict[str, Any]]]:
        """(k, {feed's name: its inputs}) of every minibatch; DataError at the first position where two
        feeds carry different labels or ids."""
        logs = [[] for _ in self.feeds]
        streams = [feed.batches(verify=verify, labels=log) for feed, log in zip(self.feeds.values(), logs)]
        for rows in zip(*streams):
            k = rows[0][0]
            self._check_labels([pop_label_rows(log, self.m) for log in logs], k * self.m)
            yield k, {who: inputs for who, (_, inputs) in zip(self.feeds, rows)}
        for stream in streams[1:]:  # their end-of-pass checks (a changed stream)
            for _ in stream:
                pass

    def _check_labels(self, labels: list, start: int) -> None:
        named = [(who, feed, rows) for (who, feed), rows in zip(self.feeds.items(), labels) if rows is not None]
        for (who_a, feed_a, a), (who_b, feed_b, b) in zip(named, named[1:]):
            for column in sorted(set(a) & set(b)):
                i = first_difference(a[column], b[column])
                if i is not None:
                    raise DataError(
                        f"the data of {who_a} ({feed_a.given}) and of {who_b} ({feed_b.given}) differ at sample "
                        f"{start + i}: {column} {_row(a[column][i])} and {_row(b[column][i])}; give both the same "
                        f"samples in the same order")


def paired(feeds: dict[str, Minibatches], drop_ragged: bool = True) -> PairedMinibatches:
    """The feeds read side by side, checked to hold as many samples in minibatches of the same m; with
    ``drop_ragged`` a last minibatch shorter than m is dropped from each, with a note."""
    (who_a, a), *rest = feeds.items()
    for who_b, b in rest:
        if b.n != a.n:
            raise DataError(f"the data of {who_a} ({a.given}) holds {a.n} samples and the data of {who_b} "
                            f"({b.given}) {b.n}: give both the same samples")
        if b.m != a.m:
            raise DataError(f"the data of {who_a} ({a.given}) comes in minibatches of {a.m} and the data of "
                            f"{who_b} ({b.given}) of {b.m}: give a minibatch size (batch_size)")
    if drop_ragged:
        for feed in feeds.values():
            feed.sample_ids, feed.limit, dropped = _drop_ragged(feed.given, feed.sample_ids, feed.m, feed.limit)
            feed.notes.extend(dropped)
    return PairedMinibatches(dict(feeds))


def pop_label_rows(log: list, n: int) -> dict[str, np.ndarray] | None:
    """The first n rows of the labels a loader logged (``batch_labels`` per batch), taken off the log;
    None when it carries none."""
    if not log or log[0] is None:
        log.clear()
        return None
    joined = {column: np.concatenate([entry[column] for entry in log]) for column in log[0]}
    log[:] = [{column: rows[n:] for column, rows in joined.items()}]
    return {column: rows[:n] for column, rows in joined.items()}


def first_difference(a: np.ndarray, b: np.ndarray) -> int | None:
    """The first row at which two (rows, ...) arrays differ (rows of another width differ everywhere)."""
    if a.shape[1:] != b.shape[1:]:
        return 0
    rows = min(len(a), len(b))
    differ = np.flatnonzero((a[:rows] != b[:rows]).any(axis=1))
    return int(differ[0]) if len(differ) else (None if len(a) == len(b) else rows)


def _row(values: np.ndarray):
    return values[0].item() if values.size == 1 else values.tolist()


# --------------------------------------------------------------------------- batches


def loader_inputs(loader, labels: list | None = None) -> Iterator[Any]:
    """The model inputs of every batch of a loader: the first element of tuples, the tensor columns of dicts;
    ``labels``: a list to which each batch's ``batch_labels`` are appended as it is read."""
    for batch in loader:
        if labels is not None:
            labels.append(batch_labels(batch))
        yield batch_inputs(batch)


def batch_labels(batch) -> dict[str, np.ndarray] | None:
    """The labels or ids a batch carries, by column (rows first): a tuple's second element (``label``), a
    dict's LABEL_COLUMNS; None when it carries none."""
    if isinstance(batch, (tuple, list)) and len(batch) > 1 and isinstance(batch[1], (torch.Tensor, np.ndarray)):
        columns = {"label": batch[1]}
    elif isinstance(batch, dict):
        columns = {k: batch[k] for k in LABEL_COLUMNS if isinstance(batch.get(k), (torch.Tensor, np.ndarray))}
    else:
        return None
    return {k: np.asarray(torch.as_tensor(v).detach().cpu()).reshape(len(v), -1) for k, v in columns.items()} or None


def batch_inputs(batch) -> Any:
    if isinstance(batch, (tuple, list)):
        return batch_inputs(batch[0])
    if isinstance(batch, dict):
        return {k: v for k, v in batch.items() if k not in LABEL_COLUMNS and isinstance(v, torch.Tensor)}
    if isinstance(batch, np.ndarray):
        return torch.from_numpy(batch)
    return batch


def rows_of(inputs) -> int:
    return int(next(iter(inputs.values())).shape[0] if isinstance(inputs, dict) else inputs.shape[0])


def take_rows(inputs, rows: slice) -> Any:
    return {k: v[rows] for k, v in inputs.items()} if isinstance(inputs, dict) else inputs[rows]


def concat_rows(parts: list) -> Any:
    if isinstance(parts[0], dict):
        return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
    return torch.cat(parts)


def rebatch(batches: Iterable, m: int) -> Iterator[Any]:
    """Batches of any sizes -> batches of m rows (the last may be shorter); batches of m pass as they are."""
    held, count = [], 0
    for x in batches:
        if not held and rows_of(x) == m:
            yield x
            continue
        held.append(x)
        count += rows_of(x)
        while count >= m:
            joined = concat_rows(held) if len(held) > 1 else held[0]
            yield take_rows(joined, slice(0, m))
            count -= m
            held = [take_rows(joined, slice(m, None))] if count else []
    if held:
        yield concat_rows(held) if len(held) > 1 else held[0]


# --------------------------------------------------------------------------- identity


def stream_digest(inputs: Iterable) -> str:
    """``sha256:HEX`` (16 hex digits) of a stream of minibatch inputs: dtype, shape and bytes of each, in order."""
    digest = hashlib.sha256()
    for x in inputs:
        update_digest(digest, x)
    return f"sha256:{digest.hexdigest()[:16]}"


def update_digest(digest, inputs) -> None:
    if isinstance(inputs, dict):
        for key in sorted(inputs):
            digest.update(f"{key}=".encode())
            update_digest(digest, inputs[key])
        return
    t = torch.as_tensor(inputs).detach().cpu().contiguous()
    digest.update(f"{t.dtype}|{tuple(t.shape)}|".encode())
    if t.numel():
        digest.update(t.reshape(-1).view(torch.uint8).numpy())
