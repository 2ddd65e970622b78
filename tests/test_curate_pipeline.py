"""`opendino curate` end to end on small image pools: stage outputs, skipping, reruns, resume, determinism, manifest."""

from __future__ import annotations

import io
import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from opendino import config
from opendino.cli import main
from opendino.curate.pipeline import CurateError, load_embedded, run_curate, stage_done
from opendino.data.manifest import read_manifest
from opendino.data.synthetic import make_shapes_dataset

pytestmark = pytest.mark.usefixtures("one_thread")

N_PLANTED = 6  # exact copies of pool images planted in the pool (as other files, some in a tar shard)
N_EVAL = 3  # evaluation images that also sit in the pool (as other files)


def _copy(src: str, dst: Path) -> None:
    """The same pixels in another file (PNG re-encoded under a new name): a near-duplicate with cosine ~1."""
    Image.open(src).save(dst)


@pytest.fixture(scope="module")
def pools(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("curate")
    items = make_shapes_dataset(root / "pool", n_per_class=8, size=48, seed=0)  # 80 images, 10 classes
    planted = root / "pool" / "planted"
    planted.mkdir()
    rng = np.random.default_rng(0)
    picks = rng.choice(len(items), N_PLANTED + N_EVAL, replace=False)
    for i in picks[:N_PLANTED]:
        _copy(items[i][0], planted / f"copy_{i}.png")
    evalset = root / "evalset"
    evalset.mkdir()
    for i in picks[N_PLANTED:]:
        _copy(items[i][0], evalset / f"eval_{i}.png")
    # a second pool source: a tar shard holding more shapes and one unreadable member
    extra = make_shapes_dataset(root / "extra", n_per_class=1, size=48, seed=5)
    with tarfile.open(root / "shard-000.tar", "w") as tar:
        for j, (path, _) in enumerate(extra):
            tar.add(path, arcname=f"x{j:03d}.png")
        info = tarfile.TarInfo("broken.png")
        info.size = 12
        tar.addfile(info, io.BytesIO(b"not an image"))
    make_shapes_dataset(root / "seeds", n_per_class=3, size=48, seed=1)
    return {"root": root, "pool": root / "pool", "shard": root / "shard-000.tar", "eval": evalset,
            "seeds": root / "seeds", "eval_originals": [items[i][0] for i in picks[N_PLANTED:]],
            "originals": {f"copy_{i}": items[i][0] for i in picks[:N_PLANTED]}}  # fmt: skip


def _overrides(pools: dict[str, Path], out: Path, *more: str) -> list[str]:
    return [
        "backbone=debug",
        f"pool=[{pools['pool']}, {pools['shard']}]",
        f"out={out}",
        f"seeds=[{{name: discs, data: {pools['seeds'] / 'disc'}, k: 3, method: sample}}, "
        f"{{name: rings, data: {pools['seeds'] / 'ring'}, method: cluster}}]",
        "embed.resize_size=32",
        "embed.crop_size=32",
        "embed.num_workers=0",
        "embed.device=cpu",
        "embed.shard_size=32",
        "dedup.threshold=0.999",
        f"dedup.eval_sets=[{pools['eval']}]",
        "dedup.eval_threshold=0.999",
        "retrieve.n_clusters=8",
        "retrieve.min_seeds=0",
        "retrieve.per_cluster=5",
        "balance.device=cpu",
        "balance.apply_to=pool",
        "balance.n_clusters=[12, 4]",
        "balance.sample_sizes=[3, 1]",
        "balance.n_resamples=2",
        "balance.n_iters=10",
        "balance.target=40",
        "report.clusters=3",
        *more,
    ]


def _cfg(pools: dict[str, Path], out: Path, *more: str) -> config.CurateConfig:
    return config.load(config.CurateConfig, None, _overrides(pools, out, *more))


@pytest.fixture(scope="module")
def finished(pools, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("run") / "curated"
    assert main(["curate", *_overrides(pools, out)]) == 0
    return out


# ------------------------------------------------------------------------------------------------ one finished run
def test_every_stage_writes_its_outputs(finished):
    for stage in config.CURATE_STAGES:
        assert stage_done(finished, stage) is not None, stage
    assert (finished / "curate.yaml").exists()
    for name in ("index.html", "report.json", "counts.png", "cluster_sizes.png", "clusters.png", "duplicates.png",
                 "eval_duplicates.png", "retrieval_discs.png", "retrieval_rings.png"):  # fmt: skip
        assert (finished / "report" / name).stat().st_size > 0, name
    page = (finished / "report" / "index.html").read_text()
    assert "http" not in page  # a static page: no external resources
    assert 'src="cluster_sizes.png"' in page


def test_embedding_is_unit_float16_and_counts_the_unreadable_member(finished, pools):
    pool = load_embedded(finished / "embed" / "pool")
    assert pool.x.dtype == np.float16 and len(pool.paths) == 80 + N_PLANTED + 10
    np.testing.assert_allclose(np.linalg.norm(pool.x.astype(np.float32), axis=1), 1.0, atol=2e-3)
    assert [p for p, _ in pool.bad] == [f"{pools['shard']}::broken.png"]
    assert stage_done(finished, "embed")["summary"]["pool"] == {"n_images": 97, "n_features": 96, "n_bad": 1}


def test_planted_copies_and_evaluation_copies_are_removed_and_nothing_else(finished, pools):
    pool = load_embedded(finished / "embed" / "pool")
    dedup = np.load(finished / "dedup" / "dedup.npz")
    kept = {pool.paths[i] for i in np.flatnonzero(dedup["keep"])}
    pairs = [(pools["originals"][Path(p).stem], p) for p in pool.paths if "/planted/" in p]
    assert len(pairs) == N_PLANTED
    assert all(len(kept & set(pair)) == 1 for pair in pairs)  # one of each original and copy is kept
    assert all(min(pair, key=pool.paths.index) in kept for pair in pairs)  # the first in pool order
    summary = stage_done(finished, "dedup")["summary"]
    assert summary["removed_as_duplicates"] == N_PLANTED
    assert summary["removed_as_eval_duplicates"] == N_EVAL
    assert summary["kept"] == len(pool.paths) - N_PLANTED - N_EVAL
    removed = {pool.paths[i] for i in np.flatnonzero(dedup["removed_eval"])}
    assert removed == set(pools["eval_originals"])


def test_retrieval_methods_and_counts(finished):
    summary = stage_done(finished, "retrieve")["summary"]
    assert summary["discs"]["method"] == "sample" and summary["discs"]["seed_images"] == 3
    assert summary["discs"]["retrieved_with_repeats"] == 9  # k=3 neighbours of 3 seeds, collisions counted
    assert summary["rings"]["method"] == "cluster" and summary["rings"]["retrieved"] > 0
    discs = np.load(finished / "retrieve" / "discs.npz")
    dedup = np.load(finished / "dedup" / "dedup.npz")
    assert dedup["keep"][discs["pool_ids"]].all()  # retrieval only searches the deduplicated pool
    assert (np.diff(discs["pool_ids"]) > 0).all()


def test_manifest_is_what_training_reads(finished):
    m = read_manifest(finished / "manifest.csv")
    rows = (finished / "manifest.csv").read_text().splitlines()
    assert rows[0] == "path,weight,source,similarity,cluster_l1,cluster_l2"
    summary = stage_done(finished, "manifest")["summary"]
    # balance.apply_to=pool: the seed sets as is, the balanced sample of the pool and the retrieved images on top
    selection = np.load(finished / "balance" / "selection.npz")
    retrieved = [np.load(finished / "retrieve" / f"{name}.npz")["pool_ids"] for name in ("discs", "rings")]
    pool_rows = set(selection["pool_ids"].tolist()).union(*(r.tolist() for r in retrieved))
    assert len(selection["pool_ids"]) == 40
    assert len(m) == summary["rows"] == 3 + 3 + len(pool_rows)
    assert sum(r.split(",")[2].startswith("seed:") for r in rows[1:]) == 6
    assert sum(r.split(",")[2].startswith("retrieved:") for r in rows[1:]) == len(
        set().union(*(r.tolist() for r in retrieved))
    )
    dedup = np.load(finished / "dedup" / "dedup.npz")
    pool = load_embedded(finished / "embed" / "pool")
    kept = {pool.paths[i] for i in np.flatnonzero(dedup["keep"])}
    assert set(m.paths[6:]) <= kept  # only deduplicated pool images


def test_balancing_flattens_the_top_level(finished):
    report = json.loads((finished / "report" / "report.json").read_text())
    top = report["balance"]["level2"]
    assert top["after"]["normalised_entropy"] >= top["before"]["normalised_entropy"]
    assert top["after"]["max_over_median"] <= top["before"]["max_over_median"]
    balance = stage_done(finished, "balance")["summary"]
    assert balance["selected"] == 40 and balance["clusters_per_level"] == [12, 4]
    assert sum(balance["top_level_picks"]) == 40


# ----------------------------------------------------------------------------------------- reruns and resumes
def _copy_run(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_rerun_skips_up_to_date_stages_and_redoes_changed_ones(finished, pools, tmp_path, capsys):
    out = _copy_run(finished, tmp_path / "copy")
    before = (out / "manifest.csv").read_bytes()
    assert main(["curate", *_overrides(pools, out)]) == 0
    printed = capsys.readouterr().out
    assert all(f"[{s}] up to date" in printed for s in config.CURATE_STAGES)
    # a new dedup threshold: dedup and what follows are redone, the embedding is not
    assert main(["curate", *_overrides(pools, out, "dedup.threshold=0.99999")]) == 0
    printed = capsys.readouterr().out
    assert "[embed] up to date" in printed and "[dedup] up to date" not in printed
    assert "[manifest] wrote" in printed
    # back to the first settings: the same manifest, byte for byte
    assert main(["curate", *_overrides(pools, out)]) == 0
    assert (out / "manifest.csv").read_bytes() == before


def test_ivf_settings_reach_the_index_and_misfits_are_one_line_errors(finished, pools, tmp_path, capsys):
    out = _copy_run(finished, tmp_path / "copy")
    # IVF probing every list is an exhaustive search: the same duplicates and retrievals as the exact flat index
    ivf = ("dedup.index=ivf", "dedup.nlist=4", "dedup.nprobe=4")
    assert main(["curate", *_overrides(pools, out, *ivf), "--stage", "dedup", "--stage", "retrieve"]) == 0
    assert "[dedup] up to date" not in capsys.readouterr().out
    for name in ("keep", "removed_eval"):
        assert (np.load(out / "dedup" / "dedup.npz")[name] == np.load(finished / "dedup" / "dedup.npz")[name]).all()
    got, want = np.load(out / "retrieve" / "discs.npz"), np.load(finished / "retrieve" / "discs.npz")
    assert (got["pool_ids"] == want["pool_ids"]).all()
    # more inverted lists than pool images: one line naming the settings, exit code 2
    assert main(["curate", *_overrides(pools, out, "dedup.index=ivf", "dedup.nlist=500")]) == 2
    err = capsys.readouterr().err
    assert "nlist=500" in err and "96 pool images" in err and "Traceback" not in err


def test_a_stage_whose_input_is_stale_is_refused(finished, pools, tmp_path, capsys):
    out = _copy_run(finished, tmp_path / "copy")
    code = main(["curate", *_overrides(pools, out, "dedup.k=10"), "--stage", "manifest"])
    assert code == 2
    assert "stage 'dedup' is out of date" in capsys.readouterr().err
    with pytest.raises(CurateError, match="has not run"):
        run_curate(_cfg(pools, tmp_path / "fresh", "stages=[balance]"))


def test_a_killed_balance_resumes_to_the_same_manifest(finished, pools, tmp_path, monkeypatch):
    import opendino.curate.kmeans as kmeans_mod

    out = _copy_run(finished, tmp_path / "copy")
    real = kmeans_mod.hierarchical_kmeans
    calls = []

    def dies_after_level_one(*args, **kwargs):
        on_level = kwargs["on_level"]

        def save_then_die(t, level):
            on_level(t, level)
            calls.append(t)
            if t == 1:
                raise KeyboardInterrupt  # the process is killed once level 1 is on disk

        return real(*args, **{**kwargs, "on_level": save_then_die})

    monkeypatch.setattr(kmeans_mod, "hierarchical_kmeans", dies_after_level_one)
    with pytest.raises(KeyboardInterrupt):
        run_curate(_cfg(pools, out, "force=true", "stages=[balance, manifest]"))
    assert (out / "balance" / "levels" / "level1.npz").exists() and stage_done(out, "balance") is None
    monkeypatch.setattr(kmeans_mod, "hierarchical_kmeans", real)
    resumed = []
    monkeypatch.setattr(kmeans_mod, "hierarchical_kmeans", lambda *a, **k: resumed.append(len(k["resume_from"]))
                        or real(*a, **k))  # fmt: skip
    run_curate(_cfg(pools, out))
    assert resumed == [1]  # level 1 was not computed again
    assert (out / "manifest.csv").read_bytes() == (finished / "manifest.csv").read_bytes()


def test_a_killed_embedding_resumes_at_the_missing_shard(pools, tmp_path, monkeypatch):
    import opendino.extract as extract_mod

    out = tmp_path / "run"
    real = extract_mod._write_shard
    written = []

    def dies_on_the_second_shard(folder, s, *args):
        if folder.name == "pool" and s == 1:
            raise KeyboardInterrupt
        written.append((folder.name, s))
        return real(folder, s, *args)

    monkeypatch.setattr(extract_mod, "_write_shard", dies_on_the_second_shard)
    with pytest.raises(KeyboardInterrupt):
        run_curate(_cfg(pools, out, "stages=[embed]"))
    assert written == [("pool", 0)] and stage_done(out, "embed") is None
    monkeypatch.setattr(extract_mod, "_write_shard", lambda folder, s, *a: written.append((folder.name, s)) or
                        real(folder, s, *a))  # fmt: skip
    run_curate(_cfg(pools, out, "stages=[embed]"))
    assert ("pool", 0) not in written[1:] and ("pool", 1) in written
    assert stage_done(out, "embed")["summary"]["pool"]["n_features"] == 96


def test_same_inputs_and_seed_give_the_same_manifest(finished, pools, tmp_path):
    out = tmp_path / "again"
    shutil.copytree(finished / "embed", out / "embed")  # embedding is tested above; redo everything after it
    run_curate(_cfg(pools, out, "force=true", "stages=[dedup, retrieve, balance, manifest]"))
    assert (out / "manifest.csv").read_bytes() == (finished / "manifest.csv").read_bytes()
    other = tmp_path / "other_seed"
    shutil.copytree(finished / "embed", other / "embed")
    run_curate(_cfg(pools, other, "seed=1", "stages=[dedup, retrieve, balance, manifest]"))
    assert (other / "manifest.csv").read_bytes() != (finished / "manifest.csv").read_bytes()


# --------------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    ("override", "says"),
    [
        ("dedup.threshold=1.5", "dedup.threshold"),
        ("dedup.nprobe=-1", "nprobe=-1"),
        ("stages=[dedup, embed]", "in the order"),
        ("balance.n_clusters=[4, 0]", "positive"),
        ("dedup.tresh=0.5", "did you mean 'dedup.threshold'"),
        ("seeds=[{name: 'a b', data: x}]", "seed set name"),
        ("manifest=out.json", "manifest="),
    ],
)
def test_bad_settings_are_one_line_errors(pools, tmp_path, capsys, override, says):
    assert main(["curate", *_overrides(pools, tmp_path / "x", override)]) == 2
    assert says in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_missing_sources_are_named_before_any_work(pools, tmp_path, capsys):
    assert main(["curate", *_overrides(pools, tmp_path / "x", f"pool=[{tmp_path / 'nope'}]")]) == 2
    assert "pool: image source does not exist" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_print_config_round_trips(pools, tmp_path, capsys):
    shards = "pool=[/data/a, '/data/shard-{000..009}.tar', 'odd, name']"  # flow-context characters survive
    assert main(["curate", *_overrides(pools, tmp_path / "x", shards), "--print-config"]) == 0
    text = capsys.readouterr().out
    (tmp_path / "c.yaml").write_text(text)
    cfg = config.load(config.CurateConfig, tmp_path / "c.yaml")
    assert cfg == _cfg(pools, tmp_path / "x", shards)
    assert cfg.pool == ("/data/a", "/data/shard-{000..009}.tar", "odd, name")


def test_the_example_config_loads():
    example = Path(__file__).resolve().parent.parent / "configs" / "curate_example.yaml"
    cfg = config.load(config.CurateConfig, example)
    assert cfg.seeds[0].name == "birds" and cfg.dedup.eval_sets == ("/data/imagenet/val",)


@pytest.mark.dist
@pytest.mark.slow
def test_two_processes_embed_and_give_the_manifest_of_one(finished, pools, tmp_path):
    import os
    import subprocess
    import sys

    out = tmp_path / "two"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "opendino",
           "curate", *_overrides(pools, out)]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count('"manifest": {') == 1  # the summary is printed once, by process 0
    shards = sorted(p.name for p in (out / "embed" / "pool").glob("shard-*.paths.txt"))
    assert shards == sorted(p.name for p in (finished / "embed" / "pool").glob("shard-*.paths.txt"))
    assert len(shards) == 4  # 97 images in shards of 32: two per process
    assert (out / "manifest.csv").read_bytes() == (finished / "manifest.csv").read_bytes()


def test_changed_embedding_settings_embed_again(finished, pools, tmp_path, capsys):
    out = _copy_run(finished, tmp_path / "copy")
    assert main(["curate", *_overrides(pools, out, "embed.resize_size=40")]) == 0
    printed = capsys.readouterr().out
    assert "[embed] pool: images or settings changed since the last run, embedding it again" in printed
    assert "[manifest] wrote" in printed
    summary = json.loads((out / "embed" / "pool" / "manifest.json").read_text())
    assert summary["complete"] and summary["fingerprint"]["resize_size"] == 40


def test_a_moved_run_with_one_more_seed_set_embeds_only_that_set(finished, pools, tmp_path, capsys):
    out = _copy_run(finished, tmp_path / "moved")  # another folder: the pool list file has another path
    more = (f"seeds=[{{name: discs, data: {pools['seeds'] / 'disc'}, k: 3, method: sample}}, "
            f"{{name: rings, data: {pools['seeds'] / 'ring'}, method: cluster}}, "
            f"{{name: squares, data: {pools['seeds'] / 'square'}}}]")  # fmt: skip
    assert main(["curate", *_overrides(pools, out, more)]) == 0
    printed = capsys.readouterr().out
    assert "[embed] seed set squares" in printed and "embedding it again" not in printed
    assert len(load_embedded(out / "embed" / "seeds" / "squares").paths) == 3
    assert stage_done(out, "retrieve")["summary"]["squares"]["method"] == "cluster"
