"""Tests for opendino.data.shards: indexing tar shards, the rank/worker split, bad samples, exact resume."""

from __future__ import annotations

import io
import itertools
import logging
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from opendino.data.sampler import TrainSample, make_train_loader
from opendino.data.shards import DEFAULT_IMAGE_EXTENSIONS, ShardDataset, expand_shards, index_shard

N_SHARDS, PER_SHARD = 6, 5
CORRUPT = "s1_2"  # key of the sample whose image bytes are garbage


def _image_bytes(red: int, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (red, 7, 9)).save(buf, format=fmt)
    return buf.getvalue()


def _write_tar(path: Path, members: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w") as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))


def _red(shard: int, j: int) -> int:
    return shard * 10 + j + 1


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """train-000..005.tar with 5 samples each (red = 10 * shard + j + 1), plus oddities in shard 0 and 1."""
    root = tmp_path_factory.mktemp("shards")
    for s in range(N_SHARDS):
        members: list[tuple[str, bytes]] = []
        if s == 0:
            members.append(("__index__.json", b"{}"))  # webdataset metadata: not a sample
            members.append(("nolabel.json", b"{}"))  # a key without an image: not a sample
        for j in range(PER_SHARD):
            key = f"s{s}_{j}"
            image = b"\x89PNG garbage" if key == CORRUPT else _image_bytes(_red(s, j))
            members += [(f"{key}.cls", str(j).encode()), (f"{key}.PNG" if j == 4 else f"{key}.png", image)]
        if s == 0:  # both a seg.png (not an image key) and a jpg and a png: the jpg is preferred
            members += [
                ("both.seg.png", _image_bytes(1)),
                ("both.png", _image_bytes(2)),
                ("both.jpg", _image_bytes(250, "JPEG")),
            ]
        _write_tar(root / f"train-{s:03d}.tar", members)
    return root


def _pattern(root: Path) -> str:
    return str(root / f"train-{{000..{N_SHARDS - 1:03d}}}.tar")


def _identify(img: Image.Image) -> tuple[int, float]:
    return int(np.asarray(img)[0, 0, 0]), float(torch.rand(()))


def _collate(samples: list[TrainSample]) -> list[tuple]:
    return [(s.crops, s.index, s.seed, s.bad_images) for s in samples]


def _dataset(root: Path, **kwargs) -> ShardDataset:
    kwargs.setdefault("batch_size", 3)
    kwargs.setdefault("buffer_size", 4)
    return ShardDataset(_pattern(root), _identify, **kwargs)


def _all_samples(root: Path) -> set[tuple[str, str]]:
    return {(shard, name) for shard in expand_shards(_pattern(root)) for name in index_shard(shard).names}


# ----------------------------------------------------------------------------------------------------------- indexing
def test_index_follows_the_webdataset_grouping(shard_dir: Path) -> None:
    index = index_shard(str(shard_dir / "train-000.tar"))
    assert index.names == [f"s0_{j}.png" for j in range(4)] + ["s0_4.PNG", "both.jpg"]
    assert index.problem is None
    wds = pytest.importorskip("webdataset")
    with open(shard_dir / "train-000.tar", "rb") as f:
        files = wds.tariterators.tar_file_iterator(f)
        samples = list(wds.tariterators.group_by_keys({**x, "__url__": "u"} for x in files))
    assert [s["__key__"] for s in samples] == ["__index__", "nolabel", *(f"s0_{j}" for j in range(PER_SHARD)), "both"]
    with_image = [(s["__key__"], [e for e in DEFAULT_IMAGE_EXTENSIONS if e in s]) for s in samples]
    assert [f"{key}.{exts[0]}" for key, exts in with_image if exts] == [n.lower() for n in index.names]


def test_damaged_shards_keep_what_precedes_the_damage(tmp_path: Path, shard_dir: Path) -> None:
    data = (shard_dir / "train-002.tar").read_bytes()
    with tarfile.open(shard_dir / "train-002.tar") as tf:
        members = {m.name: m for m in tf}
    (tmp_path / "truncated.tar").write_bytes(data[: members["s2_3.png"].offset_data + 10])  # cut inside s2_3.png
    index = index_shard(str(tmp_path / "truncated.tar"))
    assert index.names == ["s2_0.png", "s2_1.png", "s2_2.png"] and "truncated" in str(index.problem)
    garbled = bytearray(data)
    header = members["s2_1.cls"].offset
    garbled[header : header + 512] = b"\x7f" * 512  # an unreadable header in the middle
    (tmp_path / "garbled.tar").write_bytes(bytes(garbled))
    index = index_shard(str(tmp_path / "garbled.tar"))
    assert index.names == ["s2_0.png"] and "unreadable tar header" in str(index.problem)
    (tmp_path / "junk.tar").write_bytes(b"not a tar at all" * 100)
    assert len(index_shard(str(tmp_path / "junk.tar"))) == 0
    assert "FileNotFoundError" in str(index_shard(str(tmp_path / "gone.tar")).problem)  # reported, not raised


def test_expand_shards(shard_dir: Path) -> None:
    expected = [str(shard_dir / f"train-{s:03d}.tar") for s in range(N_SHARDS)]
    assert expand_shards(_pattern(shard_dir)) == expected
    assert expand_shards(str(shard_dir / "*.tar")) == expected
    assert expand_shards([expected[3], str(shard_dir / "train-00[0-3].tar")]) == expected[:4]  # sorted, unique
    with pytest.raises(ValueError, match="no shard matches"):
        expand_shards(str(shard_dir / "val-*.tar"))
    with pytest.raises(ValueError, match=r"no shard matches .*train-006\.tar"):
        expand_shards(str(shard_dir / "train-{000..006}.tar"))  # one listed shard is missing


# ------------------------------------------------------------------------------------------------------------- stream
@pytest.mark.parametrize("epoch", [0, 1])
def test_every_sample_is_seen_once_per_epoch_across_ranks_and_workers(shard_dir: Path, epoch: int) -> None:
    ds = _dataset(shard_dir, world_size=2)
    seen = [item for reader in range(4) for item in ds.reader_epoch(epoch, reader=reader, readers=4)]
    assert len(seen) == len(set(seen)) and set(seen) == _all_samples(shard_dir)
    shards_of_reader0 = {shard for shard, _ in ds.reader_epoch(epoch, reader=0, readers=4)}
    assert len(shards_of_reader0) == 2  # 6 shards over 4 readers: 2, 2, 1, 1


def test_order_is_deterministic_shuffled_and_seed_dependent(shard_dir: Path) -> None:
    def firsts(**kwargs) -> list:
        return [s for batch in itertools.islice(_dataset(shard_dir, **kwargs).iter_batches(), 8) for s in batch]

    a = firsts(seed=1)
    assert a == firsts(seed=1)
    assert [s.crops[0] for s in a] != [s.crops[0] for s in firsts(seed=2)]


def test_no_shuffle_reads_the_shards_in_order(shard_dir: Path) -> None:
    ds = _dataset(shard_dir, shuffle=False)
    order = ds.reader_epoch(0, reader=0, readers=1)
    assert order == [(shard, name) for shard in ds.shards for name in index_shard(shard).names]


def test_bad_images_are_replaced_by_the_next_sample_and_reported(shard_dir: Path) -> None:
    ds = _dataset(shard_dir, shuffle=False)
    samples = [s for batch in itertools.islice(ds.iter_batches(), 6) for s in batch]
    assert all(len(batch) == 3 for batch in itertools.islice(ds.iter_batches(), 6))
    bad = [i for i, s in enumerate(samples) if s.bad_images]
    assert len(bad) == 1
    ((path, reason),) = samples[bad[0]].bad_images
    assert path.endswith(f"train-001.tar:{CORRUPT}.png") and "not a recognised image format" in reason
    assert samples[bad[0]].crops[0] == samples[bad[0] + 1].crops[0] == _red(1, 3)  # the next one stands in
    assert samples[bad[0]].seed != samples[bad[0] + 1].seed  # with the bad slot's own seed


def test_sample_seeds_are_distinct_and_reproduce_the_augmentation(shard_dir: Path) -> None:
    samples = [
        s
        for w in range(2)
        for b in itertools.islice(_dataset(shard_dir).iter_batches(worker=w, num_workers=2), 20)
        for s in b
    ]
    assert len({s.seed for s in samples}) == len(samples)
    for s in samples[:5]:
        torch.manual_seed(s.seed)
        assert s.crops[1] == float(torch.rand(()))


@pytest.mark.parametrize(("rank", "world_size", "num_workers"), [(0, 1, 2), (1, 2, 2), (0, 1, 0)])
def test_resume_reproduces_the_uninterrupted_run(shard_dir: Path, rank: int, world_size: int, num_workers: int) -> None:
    def run(start_step: int, steps: int) -> list:
        ds = _dataset(shard_dir, rank=rank, world_size=world_size, start_step=start_step, seed=3)
        return list(itertools.islice(make_train_loader(ds, num_workers=num_workers, collate_fn=_collate), steps))

    full = run(0, 14)  # ~1.5 epochs per reader with 2 readers: batches cross epoch boundaries
    assert full[5:] == run(5, 9)
    assert full[8:] == run(8, 6)
    if num_workers == 2:  # the DataLoader interleaves the two workers' streams, which differ
        assert full[0] != full[1]


def test_resume_many_epochs_later_seeks_without_replaying(shard_dir: Path) -> None:
    """Step 41 with 2 workers: worker 0 plays role 1 from its batch 20 (0-based), reader-epochs into the stream."""
    uninterrupted = list(itertools.islice(_dataset(shard_dir).iter_batches(worker=1, num_workers=2), 24))
    resumed = list(itertools.islice(_dataset(shard_dir, start_step=41).iter_batches(worker=0, num_workers=2), 3))
    assert resumed == uninterrupted[20:23]


def test_worker_streams_are_what_the_dataloader_delivers(shard_dir: Path) -> None:
    ds = _dataset(shard_dir, start_step=3)
    via_loader = list(itertools.islice(make_train_loader(ds, num_workers=2, collate_fn=_collate), 6))
    workers = [ds.iter_batches(worker=w, num_workers=2) for w in range(2)]
    by_hand = [_collate(next(workers[t % 2])) for t in range(6)]
    assert via_loader == by_hand


def test_damaged_shard_is_logged_not_raised(tmp_path: Path, shard_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    for s in range(2):
        (tmp_path / f"ok-{s}.tar").write_bytes((shard_dir / f"train-00{s + 2}.tar").read_bytes())
    (tmp_path / "ok-2.tar").write_bytes((shard_dir / "train-004.tar").read_bytes()[:1500])
    ds = ShardDataset(str(tmp_path / "ok-*.tar"), _identify, batch_size=4)
    with caplog.at_level(logging.WARNING, logger="opendino.data.shards"):
        batches = list(itertools.islice(ds.iter_batches(), 5))
    assert all(len(b) == 4 for b in batches)
    assert any("ok-2.tar is damaged" in r.getMessage() for r in caplog.records)


def test_unreadable_shards_fail_instead_of_hanging(tmp_path: Path) -> None:
    for s in range(2):
        (tmp_path / f"junk-{s}.tar").write_bytes(b"junk" * 300)
    ds = ShardDataset(str(tmp_path / "junk-*.tar"), _identify, batch_size=2)
    with pytest.raises(RuntimeError, match="no readable samples"):
        next(ds.iter_batches())


def test_fewer_shards_than_readers_is_a_clear_error(shard_dir: Path) -> None:
    with pytest.raises(ValueError, match=r"6 shard.* for 8 readers"):
        _dataset(shard_dir, world_size=8, rank=0)
    with pytest.raises(ValueError, match=r"6 shard.* for 8 readers"):
        next(_dataset(shard_dir, world_size=2).iter_batches(worker=0, num_workers=4))


# ------------------------------------------------------------------------------------------------ member references
def test_shard_images_are_listed_as_member_references_that_load_image_reads(shard_dir):
    from opendino.data.shards import list_shard_images, member_ref, split_member_ref
    from opendino.data.sources import BadImageError, ImageDataset, list_images, load_image, source_kind

    refs = list_images(_pattern(shard_dir))
    assert refs == list_shard_images(_pattern(shard_dir))
    assert source_kind(_pattern(shard_dir)) == "shards"
    assert len(refs) == N_SHARDS * PER_SHARD + 1  # + the "both" sample of shard 0
    shard0 = str(shard_dir / "train-000.tar")
    assert refs[0] == member_ref(shard0, "s0_0.png") and split_member_ref(refs[0]) == (shard0, "s0_0.png")
    assert member_ref(shard0, "both.jpg") in refs  # the preferred image of a multi-image sample
    assert int(np.asarray(load_image(refs[1]))[0, 0, 0]) == _red(0, 1)
    assert list_images(shard_dir / "train-002.tar")[4].endswith("train-002.tar::s2_4.PNG")
    # the corrupt member, a missing member and a missing shard are bad images, not crashes
    with pytest.raises(BadImageError):
        load_image(member_ref(str(shard_dir / "train-001.tar"), f"{CORRUPT}.png"))
    with pytest.raises(BadImageError, match="no member"):
        load_image(member_ref(shard0, "absent.png"))
    with pytest.raises(BadImageError, match="unreadable"):
        load_image(member_ref(str(shard_dir / "absent.tar"), "s0_0.png"))
    ds = ImageDataset(refs[:6])
    assert [ds[i].reason for i in range(6)] == [None] * 6


def test_a_manifest_of_member_references_is_read_by_training_sources(shard_dir, tmp_path):
    from opendino.data.manifest import read_manifest, write_manifest
    from opendino.data.sources import BadImageError, list_images, load_image

    refs = list_images(str(shard_dir / "train-00[34].tar"))
    write_manifest(tmp_path / "m.csv", refs, weights=[1.0] * len(refs))
    assert read_manifest(tmp_path / "m.csv").paths == refs
    assert int(np.asarray(load_image(read_manifest(tmp_path / "m.csv").paths[-1]))[0, 0, 0]) == _red(4, 4)
    # a name that merely contains "::" but is no .tar reference is a plain (missing) file
    assert not Path("a::b.png").exists()
    with pytest.raises(BadImageError, match="no such file"):
        load_image("a::b.png")
