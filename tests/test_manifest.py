"""Tests for opendino.data.manifest (the curation -> training contract) and source_kind."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest

from opendino.data.manifest import Manifest, read_manifest, read_manifest_paths, write_manifest
from opendino.data.sources import list_images, source_kind

SUFFIXES = [".csv", ".tsv", ".parquet"]


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_round_trip_with_weights_and_extra_columns(tmp_path: Path, suffix: str) -> None:
    paths = ["a.jpg", "sub/b, with comma.png", "tab\there.png", "/abs/c.png", 'q"uote.jpg']
    weights = [0.5, 2.0, 0.0, 1e-300, 3.25]
    target = tmp_path / f"m{suffix}"
    write_manifest(target, paths, weights, extra_columns={"cluster": [3, 1, 4, 1, 5], "seed_set": list("abcde")})
    manifest = read_manifest(target)
    resolved = [str(tmp_path / p) for p in paths[:3]] + ["/abs/c.png", str(tmp_path / 'q"uote.jpg')]
    assert manifest.paths == resolved  # relative to the manifest's folder, absolute ones kept
    assert manifest.weights is not None and manifest.weights.tolist() == weights  # exact round trip
    assert len(manifest) == 5
    assert list_images(target) == resolved  # a manifest is a file list too: same paths
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]  # no temporary left behind


@pytest.mark.parametrize("suffix", SUFFIXES)
@pytest.mark.parametrize("weights", [None, [2.0, 2.0, 2.0]])
def test_uniform_weights_are_none(tmp_path: Path, suffix: str, weights: list[float] | None) -> None:
    write_manifest(tmp_path / f"m{suffix}", ["a", "b", "c"], weights)
    assert read_manifest(tmp_path / f"m{suffix}") == Manifest([str(tmp_path / p) for p in "abc"], None)


def test_csv_written_by_hand_reads_like_list_images(tmp_path: Path) -> None:
    csv_file = tmp_path / "by_hand.csv"
    csv_file.write_text(
        '\ufeff cluster , path ,weight\n3, a.jpg ,1\n1,"b, c.png",3\n7,/abs/c.png,0\n', encoding="utf-8"
    )
    manifest = read_manifest(csv_file)
    assert (
        manifest.paths == list_images(csv_file) == [str(tmp_path / "a.jpg"), str(tmp_path / "b, c.png"), "/abs/c.png"]
    )
    assert manifest.weights is not None and manifest.weights.tolist() == [1.0, 3.0, 0.0]
    assert read_manifest_paths(csv_file) == manifest.paths


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("file,weight\na.jpg,1\n", "no 'path' column"),
        ("", "no 'path' column"),
        ("path,weight\n", "manifest has no rows"),
        ("path,weight\n,1\n", "empty 'path' on line 2"),
        ("path,weight\na.jpg,-1\n", r"weight '-1' of .*a\.jpg.* must be finite and >= 0"),
        ("path,weight\na.jpg,nan\n", "must be finite"),
        ("path,weight\na.jpg,inf\n", "must be finite"),
        ("path,weight\na.jpg,\n", "is not a number"),
        ("path,weight\na.jpg,heavy\n", r"'heavy' .* is not a number"),
        ("path,weight\na.jpg,0\nb.jpg,0.0\n", "all 2 weights are 0"),
    ],
)
def test_bad_manifests_are_clear_errors(tmp_path: Path, text: str, match: str) -> None:
    (tmp_path / "m.csv").write_text(text)
    with pytest.raises(ValueError, match=match):
        read_manifest(tmp_path / "m.csv")


def test_parquet_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"file": ["a.jpg"]}), tmp_path / "nopath.parquet")
    with pytest.raises(ValueError, match="no 'path' column"):
        read_manifest(tmp_path / "nopath.parquet")
    pq.write_table(pa.table({"path": ["a.jpg", None]}), tmp_path / "null.parquet")
    with pytest.raises(ValueError, match="'path' of row 1 must be a non-empty string"):
        read_manifest(tmp_path / "null.parquet")
    pq.write_table(pa.table({"path": ["a.jpg", "b.jpg"], "weight": [1.0, None]}), tmp_path / "nullw.parquet")
    with pytest.raises(ValueError, match=r"weight None .* is not a number"):
        read_manifest(tmp_path / "nullw.parquet")
    (tmp_path / "junk.parquet").write_text("not parquet")
    with pytest.raises(ValueError, match="not a readable Parquet file"):
        read_manifest(tmp_path / "junk.parquet")
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)  # as if pyarrow were not installed
    with pytest.raises(ImportError, match="pip install pyarrow"):
        read_manifest(tmp_path / "nopath.parquet")


def test_unsupported_or_missing_manifest(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unsupported manifest"):
        write_manifest(tmp_path / "m.json", ["a.jpg"])
    with pytest.raises(ValueError, match="does not exist"):
        read_manifest(tmp_path / "nope.csv")


@pytest.mark.parametrize(
    ("args", "match"),
    [
        ((["a.jpg"], [1.0, 2.0]), "2 weights for 1 paths"),
        ((["a.jpg", "b.jpg"], [1.0, -2.0]), "must be finite and >= 0"),
        (([], None), "no rows"),
        ((["a.jpg", " "], None), "empty path at row 1"),
    ],
)
def test_write_refuses_what_could_not_be_read(tmp_path: Path, args: tuple, match: str) -> None:
    target = tmp_path / "m.csv"
    write_manifest(target, ["keep.jpg"])
    with pytest.raises(ValueError, match=match):
        write_manifest(target, *args)
    assert read_manifest(target).paths == [str(tmp_path / "keep.jpg")]  # the old manifest is intact


def test_write_refuses_bad_extra_columns(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="reserved"):
        write_manifest(tmp_path / "m.csv", ["a.jpg"], extra_columns={"weight": [1]})
    with pytest.raises(ValueError, match="has 2 values for 1 paths"):
        write_manifest(tmp_path / "m.csv", ["a.jpg"], extra_columns={"cluster": [1, 2]})
    assert not os.listdir(tmp_path)


def test_weights_come_back_as_float64(tmp_path: Path) -> None:
    write_manifest(tmp_path / "m.tsv", ["a", "b"], np.array([1, 3], dtype=np.int64))
    weights = read_manifest(tmp_path / "m.tsv").weights
    assert weights is not None and weights.dtype == np.float64 and weights.tolist() == [1.0, 3.0]


def test_source_kind(tmp_path: Path) -> None:
    (tmp_path / "imgs").mkdir()
    for name in ("m.csv", "m.parquet", "l.txt", "s.tar", "notes.md"):
        (tmp_path / name).write_text("")
    assert source_kind(tmp_path / "imgs") == "folder"
    assert source_kind(tmp_path / "m.csv") == source_kind(tmp_path / "m.parquet") == "manifest"
    assert source_kind(tmp_path / "l.txt") == "list"
    assert source_kind(tmp_path / "s.tar") == "shards"
    assert source_kind(str(tmp_path / "train-{000..009}.tar")) == "shards"
    assert source_kind(str(tmp_path / "*.tar")) == "shards"
    with pytest.raises(ValueError, match="does not exist"):
        source_kind(tmp_path / "nope.csv")
    with pytest.raises(ValueError, match="unsupported image source"):
        source_kind(tmp_path / "notes.md")
