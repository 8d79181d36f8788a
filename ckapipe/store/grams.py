"""A run's Gram cache at one minibatch size m: the centered Gram of every layer of a minibatch in one row.

    RUN/grams/m<m>/centred          float64 (N // m, layers, m(m+1)/2), chunks (1, layers, ·): upper triangle
                                    with the diagonal of the Gram of the mean-centered features
    RUN/grams/m<m>/mean_products    float64 (N // m, layers, m + 1): c_i·μ and μ·μ (the raw Gram follows)
    RUN/grams/m<m>/checksums        int64 (N // m, 2), chunks (1, 2): the tags of row k's two files
    RUN/grams/m<m>/centred_done     uint8 (N // m,), chunks (1,): row k's marker, set last

The group is stamped with its run's key and layer list when created (``gram_group``), and a cache
whose stamp disagrees is refused (``foreign``): rows are positional. Store version 2 kept
``triangles`` (U-centered strict triangles) and ``done`` without checksums: still read for linear CKA.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import zarr
import zarr.errors
from zarr.core.buffer import default_buffer_prototype

from ckapipe.errors import StoreError
from ckapipe.kernels import check_minibatch_size, u_centered_triangle_from_packed
from ckapipe.store.integrity import CHECKSUMS, NO_TAG, checksummed, chunk_file, decode_failure, file_tag, tag_problem

GRAM_KEY, GRAM_LAYERS = "run_key", "layers"  # the stamp of a Gram cache: whose Grams, of which layers
GRAM_COMPRESSORS = None  # Grams are dense float64: compression buys little and costs every re-analysis


@dataclass
class GramCache:
    """The Grams of one run at one minibatch size m, every layer of a minibatch in one chunk.

    Row k holds, for every layer in the run's order, the upper triangle with the
    diagonal of C = X̃ X̃ᵀ, X̃ the mean-centered features of minibatch k (m(m+1)/2
    float64 numbers), and the mean products [c_i·μ for each row i, μ·μ] (m + 1),
    so that every kernel measure has what it needs: U(C) = U(X Xᵀ) for the unbiased
    HSIC (derived on read), C itself, distances, and X Xᵀ = C + a1ᵀ + 1aᵀ + s. The
    marker of k is set once the whole row is written. One chunk per minibatch means
    one file and one read for all layers. In a checksummed store each of the row's
    two files ends with its crc32c and their tags are recorded before the marker.

    A cache of store version 2 (``layout == 2``) holds the U-centered strict triangles
    only, without checksums: it serves ``read`` (linear CKA) and nothing else.
    """

    CENTERED, MEANS, MARKERS = "centred", "mean_products", "centred_done"  # on-disk names: spelled as store version 3 wrote them
    LEGACY, LEGACY_MARKERS = "triangles", "done"  # store version 2

    group: zarr.Group = field(repr=False)
    layers: list[str]
    m: int
    run_name: str
    run_key: str = ""
    run_path: Path | None = None
    checksummed: bool = False

    @property
    def attrs(self):
        return self.group.attrs

    @property
    def label(self) -> str:
        return f"grams/m{self.m}"

    @functools.cached_property
    def layout(self) -> int:
        """3: centered Grams with their diagonal and mean products; 2: U-centered strict triangles only."""
        return 3 if self.CENTERED in self.group else 2

    @functools.cached_property
    def _rows(self) -> zarr.Array:
        return self.group[self.CENTERED if self.layout == 3 else self.LEGACY]

    @functools.cached_property
    def _means(self) -> zarr.Array:
        return self.group[self.MEANS]

    @functools.cached_property
    def _markers(self) -> zarr.Array:
        return self.group[self.MARKERS if self.layout == 3 else self.LEGACY_MARKERS]

    @functools.cached_property
    def _checksums(self) -> zarr.Array:
        return self.group[CHECKSUMS]

    @property
    def n_minibatches(self) -> int:
        return self._rows.shape[0]

    def done(self, ks: Sequence[int] | None = None) -> np.ndarray:
        """Boolean marker per minibatch (all of them, or those of ks)."""
        if ks is None:
            return self._markers[:].astype(bool)
        if not len(ks):
            return np.zeros(0, dtype=bool)
        return np.concatenate([self._markers[a:b] for a, b in spans(ks)]).astype(bool)

    def read(self, ks: Sequence[int], out: np.ndarray | None = None) -> np.ndarray:
        """(len(ks), layers, m(m-1)/2) strict upper triangles of U(X Xᵀ) of minibatches ks (sorted):
        what linear CKA reads, from either layout, into ``out`` when given (see ``read_centered``)."""
        if self.layout == 2:
            return self._read(self._rows, ks, out)
        triangles = u_centered_triangle_from_packed(self.read_centered(ks))
        if out is None:
            return triangles
        out[...] = triangles
        return out

    def read_centered(self, ks: Sequence[int], out: np.ndarray | None = None) -> np.ndarray:
        """(len(ks), layers, m(m+1)/2) upper triangles with the diagonal of the centered Grams; an error
        naming the run and the minibatch when a row is unreadable, or (checksummed) not the one written there.

        Zarr decodes straight into ``out`` (C-contiguous float64 of that shape) when given:
        no second task-sized buffer, which the allocator would keep around.
        """
        self._require_layout_3()
        return self._read(self._rows, ks, out)

    def read_means(self, ks: Sequence[int]) -> np.ndarray:
        """(len(ks), layers, m + 1) mean products [c_i·μ, μ·μ] of minibatches ks (sorted)."""
        self._require_layout_3()
        return self._read(self._means, ks, None)

    def write(self, ks: Sequence[int], centered: np.ndarray, means: np.ndarray) -> None:
        """Rows ks (sorted; (len(ks), layers, m(m+1)/2) and (len(ks), layers, m + 1) on the host), then
        their tags, then their markers."""
        self._require_layout_3()
        for array, values in ((self._rows, centered), (self._means, means)):
            i = 0
            for a, b in spans(ks):
                array[a:b] = values[i:i + b - a]
                i += b - a
        if self.tagged:
            for a, b in spans(ks):
                self._checksums[a:b] = [[self._file_tag(array, k) for array in self.arrays] for k in range(a, b)]
        for a, b in spans(ks):
            self._markers[a:b] = 1

    def _read(self, array: zarr.Array, ks: Sequence[int], out: np.ndarray | None) -> np.ndarray:
        if self.tagged:  # rows marked done must be the files written there; others read as NaN
            written = [k for k, done in zip(ks, self.done(ks)) if done]
            for k, why in zip(written, self.tag_problems(written, [array])):
                if why:
                    raise self.unreadable(k, why)
        if out is None:
            out = np.empty((len(ks), *array.shape[1:]), dtype=np.float64)
        nd_buffer = default_buffer_prototype().nd_buffer
        i = 0
        for a, b in spans(ks):
            try:
                array.get_basic_selection(slice(a, b), out=nd_buffer.from_numpy_array(out[i:i + b - a]))
            except Exception as err:  # noqa: BLE001 - codecs and stores raise many types
                raise self.unreadable(self._first_unreadable(array, range(a, b)), decode_failure(err)) from None
            i += b - a
        return out

    @property
    def arrays(self) -> list[zarr.Array]:
        """The arrays a row is made of (one file each per minibatch), in the order of their tags."""
        return [self._rows, self._means] if self.layout == 3 else [self._rows]

    @property
    def tagged(self) -> bool:
        """Whether rows carry tags (a checksummed store's cache of this layout)."""
        return self.checksummed and self.layout == 3

    def tag_problems(self, ks: Sequence[int], arrays: Sequence[zarr.Array] | None = None) -> list[str | None]:
        """For each row k of ks (sorted): why one of its files (of ``arrays``, default all) is not the
        one written there, or None."""
        if not self.tagged:
            return [None] * len(ks)
        recorded = np.concatenate([self._checksums[a:b] for a, b in spans(ks)]) if len(ks) else []
        columns = [(i, a) for i, a in enumerate(self.arrays) if arrays is None or any(a is b for b in arrays)]
        return [next((why for i, array in columns
                      if (why := tag_problem(self.run_key, self.run_path, array, self._label(array), k, tags[i]))), None)
                for k, tags in zip(ks, recorded)]

    def row_problem(self, k: int) -> str | None:
        """Why row k does not decode to finite numbers, or None (after its tags are checked)."""
        for array in self.arrays:
            try:
                if not np.isfinite(array[k]).all():
                    return "it holds NaN or inf (its file is missing, or its bytes were changed)"
            except Exception as err:  # noqa: BLE001 - codecs and stores raise many types
                return decode_failure(err)
        return None

    def delete_row(self, k: int) -> None:
        """Remove row k's files and its marker, so that it is filled again."""
        for array in self.arrays:
            chunk_file(self.run_path, array, k).unlink(missing_ok=True)
        self._markers[k] = 0

    def unreadable(self, k: int, why: str) -> StoreError:
        return StoreError(
            f"the Gram row of minibatch {k} (m={self.m}, every layer) in run {self.run_name} cannot be read: {why}; "
            f"`ckapipe verify {self.run_name} --repair` deletes it (analyse with --no-gram-cache meanwhile)"
        )

    def _first_unreadable(self, array: zarr.Array, ks) -> int:
        for k in ks:
            try:
                array[k]
            except Exception:  # noqa: BLE001 - the row that fails to decode
                return k
        return ks[0]

    def misfit(self, n_minibatches: int) -> str | None:
        """Why this cache does not fit a run of ``n_minibatches`` full minibatches and its layers, or None."""
        m = self.m
        width = m * (m + 1) // 2 if self.layout == 3 else m * (m - 1) // 2
        shape = self._rows.shape
        if shape == (n_minibatches, len(self.layers), width) and not (self.tagged and CHECKSUMS not in self.group):
            return None
        return f"does not fit the run ({'no checksums' if shape == (n_minibatches, len(self.layers), width) else f'shape {shape}'})"

    def _require_layout_3(self) -> None:
        if self.layout != 3:
            raise StoreError(
                f"the Gram cache of run {self.run_name} (m={self.m}) has the layout of store version 2 "
                f"(U-centered Grams only): it serves linear CKA; other measures rebuild it from the activations"
            )

    def _label(self, array: zarr.Array) -> str:
        return f"{self.label}/{array.basename}"

    def _file_tag(self, array: zarr.Array, k: int) -> int:
        return file_tag(self.run_key, self._label(array), k, chunk_file(self.run_path, array, k))


def gram_group(run_group: zarr.Group, m: int, create: bool, run_key: str, layers: list[str]) -> zarr.Group | None:
    """The group ``grams/m<m>`` of a run's group, or None when absent; ``create`` makes it, stamped with
    the run's key and layers in the same write (or returns the one another process made first)."""
    path = f"grams/m{m}"
    if path in run_group:
        return run_group[path]
    if not create:
        return None
    check_minibatch_size(m)
    try:
        return run_group.create_group(path, attributes={GRAM_KEY: run_key, GRAM_LAYERS: layers})
    except (zarr.errors.ContainsArrayError, zarr.errors.ContainsGroupError):
        return run_group[path]


def foreign(group: zarr.Group, run_key: str, layers: list[str]) -> str | None:
    """Why a Gram cache group is not this run's to read (a layout of store version 1, another run's
    stamp, no stamp), or None."""
    if "done" in group and GramCache.LEGACY not in group and GramCache.CENTERED not in group:
        return "has the per-layer layout of ckapipe store version 1"
    stamp = group.attrs.get(GRAM_KEY), group.attrs.get(GRAM_LAYERS)
    if stamp != (run_key, layers):
        whose = f"run key {stamp[0]}" if stamp[0] != run_key else "another layer list"
        return f"is not this run's ({whose if stamp[0] else 'no stamp'})"
    return None


def holds_grams(group: zarr.Group) -> bool:
    """Whether a Gram cache group has rows of either layout."""
    return GramCache.CENTERED in group or GramCache.LEGACY in group


def create_gram_arrays(group: zarr.Group, m: int, n_minibatches: int, n_layers: int, tagged: bool) -> None:
    """Whatever arrays of the layout 3 cache are missing; the markers last: a cache with markers has all its arrays."""
    if tagged:
        _create_missing(group, CHECKSUMS, shape=(n_minibatches, 2), chunks=(1, 2), dtype="int64", fill_value=NO_TAG)
    for name, width in ((GramCache.CENTERED, m * (m + 1) // 2), (GramCache.MEANS, m + 1)):
        _create_missing(group, name, shape=(n_minibatches, n_layers, width), chunks=(1, n_layers, width),
                        dtype="float64", fill_value=float("nan"),
                        compressors=checksummed(()) if tagged else GRAM_COMPRESSORS,
                        config={"write_empty_chunks": True})
    _create_missing(group, GramCache.MARKERS, shape=(n_minibatches,), chunks=(1,), dtype="uint8", fill_value=0)


def _create_missing(group: zarr.Group, name: str, **array) -> None:
    """Create an array unless it exists (or another process creates it first)."""
    if name in group:
        return
    try:
        group.create_array(name, **array)
    except (zarr.errors.ContainsArrayError, zarr.errors.ContainsGroupError):
        pass


def spans(ks: Sequence[int]) -> list[tuple[int, int]]:
    """Sorted indices as [start, stop) runs of consecutive values (a Zarr slice per run of
    consecutive chunks is much faster than an orthogonal selection)."""
    out: list[list[int]] = []
    for k in ks:
        if out and out[-1][1] == k:
            out[-1][1] = k + 1
        else:
            out.append([k, k + 1])
    return [(a, b) for a, b in out]
