"""Curation manifests: the table of images (and sampling weights) that curation writes and training reads.

This format is the contract between ``opendino curate`` and ``opendino train``; nothing else couples them.

- A table with a header row, one image per row: ``.csv`` (comma), ``.tsv`` (tab) or ``.parquet``. CSV and TSV are
  UTF-8 (a leading BOM is tolerated) with standard CSV quoting, so paths may contain commas, tabs or quotes.
- ``path`` (required, text): the image file. Relative paths are resolved against the manifest's own folder, so a
  manifest and its images can move together; surrounding whitespace is stripped; an empty cell is an error. Paths
  are not checked for existence (a missing file is a bad image when loaded, replaced and reported by training).
- ``weight`` (optional, number): the row's sampling weight, finite and >= 0; training draws row i with probability
  ``weight[i] / sum(weight)`` (with replacement). 0 means never drawn. Without the column (or with all weights
  equal) every epoch is a plain permutation of the rows.
- Any other column (``cluster``, ``seed_set``, ``distance``, ...) is carried for people and ignored by training.
- Row order is meaningful: row i is dataset index i. A path may appear in several rows.

A ``.csv`` with a ``path`` column is also a file list for ``sources.list_images``; both read it through
``read_manifest_paths`` here, so they always agree on its paths. ``write_manifest`` writes atomically (a temporary
file in the same folder, then ``os.replace``), so a reader never sees half a manifest.
"""

from __future__ import annotations

import contextlib
import csv
import math
import os
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["MANIFEST_SUFFIXES", "Manifest", "read_manifest", "read_manifest_paths", "write_manifest"]

MANIFEST_SUFFIXES = (".csv", ".tsv", ".parquet")
_DELIMITERS = {".csv": ",", ".tsv": "\t"}


@dataclass(frozen=True)
class Manifest:
    """Absolute, normalised image ``paths`` and their sampling ``weights`` (float64, ``None`` when uniform)."""

    paths: list[str]
    weights: np.ndarray | None

    def __len__(self) -> int:
        return len(self.paths)


def _suffix(path: str) -> str:
    suffix = os.path.splitext(path)[1].lower()
    if suffix not in MANIFEST_SUFFIXES:
        raise ValueError(f"unsupported manifest {path!r}: expected one of {MANIFEST_SUFFIXES}")
    return suffix


def _resolve(entry: str, base_dir: str) -> str:
    return os.path.normpath(entry if os.path.isabs(entry) else os.path.join(base_dir, entry))


def _read_delimited(path: str, delimiter: str) -> tuple[list[str], list[str] | None]:
    """Raw (path cells, weight cells or None) of a CSV/TSV file; column names are stripped."""
    with open(path, encoding="utf-8-sig", newline="") as f:
        reader = csv.DictReader(f, delimiter=delimiter)
        columns = [c.strip() for c in reader.fieldnames or []]
        if "path" not in columns:
            raise ValueError(f"{path}: no 'path' column (columns: {columns})")
        reader.fieldnames = columns
        entries: list[str] = []
        weights: list[str] | None = [] if "weight" in columns else None
        for row in reader:
            entry = (row.get("path") or "").strip()
            if not entry:
                raise ValueError(f"{path}: empty 'path' on line {reader.line_num}")
            entries.append(entry)
            if weights is not None:
                weights.append((row.get("weight") or "").strip())
    return entries, weights


def _pyarrow_parquet() -> Any:
    try:
        import pyarrow.parquet as pq
    except ImportError as e:
        raise ImportError("Parquet manifests need pyarrow (pip install pyarrow); CSV and TSV manifests do not") from e
    return pq


def _read_parquet(path: str) -> tuple[list[str], list[Any] | None]:
    pq = _pyarrow_parquet()
    try:
        names = pq.read_schema(path).names
        wanted = [c for c in names if c.strip() in ("path", "weight")]
        table = pq.read_table(path, columns=wanted).rename_columns([c.strip() for c in wanted])
    except (OSError, ValueError) as e:  # pyarrow's ArrowInvalid is a ValueError
        raise ValueError(f"{path}: not a readable Parquet file ({e})") from e
    if "path" not in table.column_names:
        raise ValueError(f"{path}: no 'path' column (columns: {[c.strip() for c in names]})")
    entries = []
    for i, cell in enumerate(table.column("path").to_pylist()):
        if not isinstance(cell, str) or not cell.strip():
            raise ValueError(f"{path}: 'path' of row {i} must be a non-empty string, got {cell!r}")
        entries.append(cell.strip())
    weights = table.column("weight").to_pylist() if "weight" in table.column_names else None
    return entries, weights


def _read_columns(path: str) -> tuple[list[str], list[Any] | None]:
    """(resolved absolute paths, raw weight cells or None) of any supported manifest file."""
    path = os.path.abspath(os.fspath(path))
    if not os.path.isfile(path):
        raise ValueError(f"manifest does not exist or is not a file: {path!r}")
    suffix = _suffix(path)
    entries, weights = _read_parquet(path) if suffix == ".parquet" else _read_delimited(path, _DELIMITERS[suffix])
    base_dir = os.path.dirname(path)
    return [_resolve(e, base_dir) for e in entries], weights


def read_manifest_paths(path: str | os.PathLike[str]) -> list[str]:
    """The ``path`` column of a manifest, resolved (possibly empty); other columns are not parsed."""
    return _read_columns(os.fspath(path))[0]


def _check_weights(values: Sequence[Any] | np.ndarray, paths: Sequence[str], where: str) -> np.ndarray:
    """Weights as float64, or a ValueError naming the first offending row: not a number, NaN/inf, negative."""
    out = np.empty(len(values), dtype=np.float64)
    for i, value in enumerate(values):
        try:
            w = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"{where}: weight {value!r} of {paths[i]!r} (row {i}) is not a number") from None
        if not math.isfinite(w) or w < 0:
            raise ValueError(f"{where}: weight {value!r} of {paths[i]!r} (row {i}) must be finite and >= 0")
        out[i] = w
    if len(out) and not out.any():
        raise ValueError(f"{where}: all {len(out)} weights are 0, nothing could ever be sampled")
    return out


def read_manifest(path: str | os.PathLike[str]) -> Manifest:
    """Read a ``.csv`` / ``.tsv`` / ``.parquet`` manifest (format in the module docstring); errors are ValueErrors."""
    path = os.fspath(path)
    paths, raw_weights = _read_columns(path)
    if not paths:
        raise ValueError(f"{path}: manifest has no rows")
    if raw_weights is None:
        return Manifest(paths, None)
    weights = _check_weights(raw_weights, paths, path)
    return Manifest(paths, None if (weights == weights[0]).all() else weights)


def _write_delimited(f: Any, delimiter: str, columns: dict[str, list[Any]]) -> None:
    writer = csv.writer(f, delimiter=delimiter, lineterminator="\n")
    writer.writerow(columns)
    writer.writerows(zip(*columns.values(), strict=True))


def write_manifest(
    path: str | os.PathLike[str],
    paths: Sequence[str | os.PathLike[str]],
    weights: Sequence[float] | np.ndarray | None = None,
    extra_columns: Mapping[str, Sequence[Any]] | None = None,
) -> None:
    """Write a manifest atomically; the format follows the suffix (``.csv``, ``.tsv``, ``.parquet``).

    ``paths`` are written as given (relative ones will be read relative to the manifest's folder). ``weights``
    follow the reading rules (finite, >= 0, not all 0). ``extra_columns`` (name -> one value per row) come after
    ``path`` and ``weight``; CSV/TSV write them with ``str``, Parquet lets pyarrow infer their types.
    """
    path = os.fspath(path)
    suffix = _suffix(path)
    rows = [os.fspath(p) for p in paths]
    if not rows:
        raise ValueError(f"{path}: refusing to write a manifest with no rows")
    if any(not p.strip() for p in rows):
        raise ValueError(f"{path}: empty path at row {next(i for i, p in enumerate(rows) if not p.strip())}")
    columns: dict[str, list[Any]] = {"path": rows}
    if weights is not None:
        if len(weights) != len(rows):
            raise ValueError(f"{path}: {len(weights)} weights for {len(rows)} paths")
        columns["weight"] = [float(w) for w in _check_weights(weights, rows, path)]
    for name, values in (extra_columns or {}).items():
        if name.strip() in ("path", "weight") or not name.strip():
            raise ValueError(f"{path}: extra column name {name!r} is reserved or empty")
        if len(values) != len(rows):
            raise ValueError(f"{path}: extra column {name!r} has {len(values)} values for {len(rows)} paths")
        columns[name] = list(values)
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        if suffix == ".parquet":
            os.close(fd)
            pq = _pyarrow_parquet()
            pq.write_table(_arrow_table(columns), tmp)
        else:
            with os.fdopen(fd, "w", encoding="utf-8", newline="") as f:
                _write_delimited(f, _DELIMITERS[suffix], columns)
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _arrow_table(columns: dict[str, list[Any]]) -> Any:
    import pyarrow as pa

    return pa.table(columns)
