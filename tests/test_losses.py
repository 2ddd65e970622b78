"""DINOv2 losses and teacher targets: each vectorised function against its reference loop, against numbers computed by
the official code (fixtures/official/losses.safetensors, tools/make_loss_fixtures.py), gradients, bad input, and
the distributed reductions (one process, and two gloo processes)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.distributed as tdist
import torch.multiprocessing as mp
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file

from opendino import dist
from opendino.losses import (
    CenterEMA,
    dino_loss,
    dino_multicrop_loss,
    ibot_loss,
    ibot_loss_dense,
    ibot_masks_weight,
    koleo_loss,
    koleo_multicrop,
    sinkhorn_knopp,
    softmax_center,
)

FIXTURE = Path(__file__).parent / "fixtures" / "official" / "losses.safetensors"
TOL = {"rtol": 1e-6, "atol": 1e-6}


# ---------------------------------------------------------------- reference loops (the definitions, written plainly)


def _ce(student_logits: torch.Tensor, teacher_probs: torch.Tensor, temp: float) -> torch.Tensor:
    """Batch-mean cross-entropy, one row at a time."""
    rows = [-(t * F.log_softmax(s / temp, dim=-1)).sum() for s, t in zip(student_logits, teacher_probs, strict=True)]
    return torch.stack(rows).mean()


def _reference_dino(students, teachers, temp=0.1):
    loss = torch.zeros(())
    for s in students:
        for t in teachers:
            loss = loss + _ce(s, t, temp)
    return loss


def _reference_multicrop(student_global, student_local, teacher, n_global, temp=0.1):
    batch = teacher.shape[0] // n_global
    globals_, teachers = student_global.split(batch), teacher.split(batch)
    locals_ = student_local.split(batch) if len(student_local) else ()  # split() of 0 rows gives one empty chunk
    n_terms = n_global * (n_global - 1) + max(len(locals_) * n_global, 1)
    global_loss = local_loss = torch.zeros(())
    for i in range(n_global):
        for j in range(n_global):
            if i != j:
                global_loss = global_loss + _ce(globals_[i], teachers[j], temp)
    for local in locals_:
        for j in range(n_global):
            local_loss = local_loss + _ce(local, teachers[j], temp)
    return global_loss / n_terms, local_loss / n_terms


def _reference_ibot(student_patch, teacher_patch, masks, temp=0.1):
    """Per image: mean cross-entropy over its masked tokens (0 if none); then the mean over images."""
    per_image = []
    for s_img, t_img, m_img in zip(student_patch, teacher_patch, masks, strict=True):
        terms = [-(t * F.log_softmax(s / temp, dim=-1)).sum() for s, t, m in zip(s_img, t_img, m_img, strict=True) if m]
        per_image.append(torch.stack(terms).mean() if terms else torch.zeros(()))
    return torch.stack(per_image).mean()


def _reference_koleo(features, eps=1e-8):
    x = F.normalize(features, dim=-1, eps=eps)
    terms = []
    for i in range(len(x)):
        j = max((k for k in range(len(x)) if k != i), key=lambda k: float(x[i] @ x[k]))
        terms.append(-torch.log(torch.linalg.vector_norm(x[i] - x[j] + 1e-8) + eps))
    return torch.stack(terms).mean()


def _reference_sinkhorn(logits, temp, n_iterations=3):
    """Alternate normalisations of exp(logits / temp): prototype columns to 1/K, rows to 1 (float64)."""
    p = torch.exp(logits.double() / temp)
    p = p / p.sum()
    rows, k = p.shape
    for _ in range(n_iterations):
        p = p / p.sum(dim=0, keepdim=True) / k
        p = p / p.sum(dim=1, keepdim=True) / rows
    return (p * rows).float()


# ---------------------------------------------------------------- vectorised == loop


@pytest.mark.parametrize(("n_students", "n_teachers", "batch", "k"), [(1, 1, 1, 5), (3, 2, 4, 7), (8, 2, 5, 33)])
def test_dino_loss_matches_loop(n_students, n_teachers, batch, k):
    students = [torch.randn(batch, k) * 3 for _ in range(n_students)]
    teachers = [torch.randn(batch, k).softmax(-1) for _ in range(n_teachers)]
    expected = _reference_dino(students, teachers, temp=0.2)
    torch.testing.assert_close(dino_loss(students, teachers, student_temp=0.2), expected, **TOL)
    torch.testing.assert_close(dino_loss(torch.stack(students), torch.stack(teachers), student_temp=0.2), expected)


@pytest.mark.parametrize(
    ("n_global", "n_local", "batch", "k"), [(2, 8, 3, 17), (2, 0, 4, 9), (3, 2, 2, 11), (1, 4, 5, 6)]
)
def test_dino_multicrop_matches_loop(n_global, n_local, batch, k):
    student_global = torch.randn(n_global * batch, k) * 2
    student_local = torch.randn(n_local * batch, k) * 2
    teacher = torch.randn(n_global * batch, k).softmax(-1)
    got = dino_multicrop_loss(student_global, student_local, teacher, n_global_crops=n_global)
    expected = _reference_multicrop(student_global, student_local, teacher, n_global)
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, **TOL)
    if n_local == 0:  # None means no local crops too
        assert torch.equal(dino_multicrop_loss(student_global, None, teacher, n_global_crops=n_global)[0], got[0])


def test_dino_multicrop_pairs_each_global_crop_with_the_other_teacher_crop():
    """A student crop that equals its OWN teacher crop gains nothing; one that matches the OTHER crop does."""
    teacher = torch.randn(2 * 4, 10).softmax(-1)
    log_teacher = teacher.log() * 0.1  # log_softmax(x / 0.1) == log(teacher): a perfect copy
    swapped = torch.cat(log_teacher.chunk(2)[::-1])
    loss_self, _ = dino_multicrop_loss(log_teacher, None, teacher)
    loss_other, _ = dino_multicrop_loss(swapped, None, teacher)
    assert loss_other < loss_self


@pytest.mark.parametrize(("n_images", "n_patches", "k"), [(2, 4, 5), (6, 16, 32), (4, 9, 3)])
def test_ibot_loss_matches_loop_and_dense(n_images, n_patches, k):
    masks = torch.rand(n_images, n_patches) < 0.4
    masks[0] = False  # an image without masked tokens still counts in the mean
    masks[-1, 0] = True
    student = torch.randn(n_images, n_patches, k) * 2
    teacher = torch.randn(n_images, n_patches, k).softmax(-1)
    expected = _reference_ibot(student, teacher, masks)
    got = ibot_loss(student[masks], teacher[masks], ibot_masks_weight(masks), n_images)
    torch.testing.assert_close(got, expected, **TOL)
    torch.testing.assert_close(ibot_loss_dense(student, teacher, masks), expected, **TOL)


@pytest.mark.parametrize(("n", "d"), [(2, 3), (7, 24), (40, 5)])
def test_koleo_matches_loop(n, d):
    features = torch.randn(n, d) * 5
    torch.testing.assert_close(koleo_loss(features), _reference_koleo(features), **TOL)


def test_koleo_multicrop_is_a_sum_over_crops():
    cls = torch.randn(3 * 5, 8)
    expected = sum(_reference_koleo(c) for c in cls.chunk(3))
    torch.testing.assert_close(koleo_multicrop(cls, n_global_crops=3), expected, **TOL)


@pytest.mark.parametrize(("rows", "k", "temp", "n_iterations"), [(6, 32, 0.05, 3), (20, 7, 0.04, 3), (40, 5, 0.5, 50)])
def test_sinkhorn_matches_loop_and_balances(rows, k, temp, n_iterations):
    logits = torch.rand(rows, k) * 2 - 1
    q = sinkhorn_knopp(logits, temp, n_iterations=n_iterations)
    torch.testing.assert_close(q, _reference_sinkhorn(logits, temp, n_iterations), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(q.sum(-1), torch.ones(rows))  # each row an assignment
    torch.testing.assert_close(sinkhorn_knopp(logits, temp, n_iterations, n_masked_patches=rows), q)
    if n_iterations == 50:  # converged: every prototype gets rows / K of the mass
        torch.testing.assert_close(q.sum(0), torch.full((k,), rows / k), rtol=1e-4, atol=1e-4)


def test_center_ema_update():
    ema = CenterEMA(4, momentum=0.8)
    a, b = torch.randn(6, 4), torch.randn(3, 5, 4)
    ema.update(a)
    torch.testing.assert_close(ema.center, 0.2 * a.mean(0, keepdim=True))
    ema.update(b)  # 3-D: each sample's token mean first (the iBOT update)
    torch.testing.assert_close(ema.center, 0.8 * 0.2 * a.mean(0, keepdim=True) + 0.2 * b.mean(1).mean(0, keepdim=True))
    torch.testing.assert_close(ema(a, 0.5), torch.softmax((a - ema.center) / 0.5, dim=-1))
    assert "center" in ema.state_dict() and ema.center.shape == (1, 4)


# ---------------------------------------------------------------- official numbers


@pytest.fixture(scope="module")
def official():
    tensors = load_file(FIXTURE)
    with safe_open(FIXTURE, "pt") as f:
        sizes = json.loads(f.metadata()["sizes"])
    return tensors, sizes


def test_fixture_is_small_and_from_the_pinned_commit(official):
    _, sizes = official
    assert FIXTURE.stat().st_size < 200 * 1024
    assert sizes["official_commit"].startswith("b8931f7")


def test_centering_matches_official(official):
    t, sizes = official
    dino_ema, ibot_ema = CenterEMA(sizes["K"], momentum=sizes["center_momentum"]), CenterEMA(sizes["K"])
    masks = t["in.masks"]
    for step, temp in zip((1, 2), sizes["teacher_temps"], strict=True):
        torch.testing.assert_close(dino_ema.center, t[f"out.centering.dino_center_before_step{step}"], **TOL)
        torch.testing.assert_close(
            ibot_ema.center, t[f"out.centering.ibot_center_before_step{step}"].view(1, -1), **TOL
        )
        cls_logits = t[f"in.teacher_cls_logits_step{step}"]
        torch.testing.assert_close(
            softmax_center(cls_logits, dino_ema.center, temp), t[f"out.centering.dino_probs_step{step}"], **TOL
        )
        dino_ema.update(cls_logits)
        masked = t[f"in.teacher_patch_logits_step{step}"][masks]  # (M, K), row-major = mask_indices_list order
        torch.testing.assert_close(ibot_ema(masked, temp), t[f"out.centering.ibot_probs_step{step}"], **TOL)
        ibot_ema.update(masked.unsqueeze(0))
    torch.testing.assert_close(dino_ema.center, t["out.centering.dino_center_after_step2"], **TOL)
    torch.testing.assert_close(ibot_ema.center, t["out.centering.ibot_center_after_step2"].view(1, -1), **TOL)


def test_sinkhorn_matches_official(official):
    t, sizes = official
    temp = sizes["teacher_temps"][1]
    got = sinkhorn_knopp(t["in.teacher_cls_logits_step2"], temp)
    torch.testing.assert_close(got, t["out.sinkhorn.dino_probs"], **TOL)
    masked = t["in.teacher_patch_logits_step2"][t["in.masks"]]
    n_masked = torch.tensor([sizes["n_masked_patches"]])
    got = sinkhorn_knopp(masked, temp, n_masked_patches=n_masked)
    # same rows, same order of operations: bit for bit on the machine that made the fixture, ULPs elsewhere
    torch.testing.assert_close(got, t["out.sinkhorn.ibot_probs"], **TOL)
    assert n_masked.item() == sizes["n_masked_patches"]  # not reduced in place


@pytest.mark.parametrize("kind", ["centering", "sinkhorn"])
def test_dino_multicrop_matches_official_with_gradients(official, kind):
    t, sizes = official
    teacher = t["out.centering.dino_probs_step2"] if kind == "centering" else t["out.sinkhorn.dino_probs"]
    student_global = t["in.student_global_logits"].clone().requires_grad_()
    student_local = t["in.student_local_logits"].clone().requires_grad_()
    global_loss, local_loss = dino_multicrop_loss(
        student_global,
        student_local,
        teacher,
        n_global_crops=sizes["n_global_crops"],
        student_temp=sizes["student_temp"],
    )
    torch.testing.assert_close(global_loss, t[f"out.dino_{kind}.global_loss"], **TOL)
    torch.testing.assert_close(local_loss, t[f"out.dino_{kind}.local_loss"], **TOL)
    (global_loss + local_loss).backward()
    torch.testing.assert_close(student_global.grad, t[f"out.dino_{kind}.grad_student_global"], **TOL)
    torch.testing.assert_close(student_local.grad, t[f"out.dino_{kind}.grad_student_local"], **TOL)


def test_dino_without_local_crops_keeps_the_official_denominator(official):
    t, _ = official
    global_loss, local_loss = dino_multicrop_loss(
        t["in.student_global_logits"], None, t["out.centering.dino_probs_step2"]
    )
    torch.testing.assert_close(global_loss, t["out.dino_nolocal.global_loss"], **TOL)
    assert local_loss.item() == 0.0


@pytest.mark.parametrize("kind", ["centering", "sinkhorn"])
def test_ibot_matches_official_with_gradients(official, kind):
    t, _ = official
    masks = t["in.masks"]
    torch.testing.assert_close(ibot_masks_weight(masks), t["in.masks_weight"], rtol=0, atol=0)
    teacher = t["out.centering.ibot_probs_step2"] if kind == "centering" else t["out.sinkhorn.ibot_probs"]
    student = t["in.student_patch_logits"].clone().requires_grad_()
    loss = ibot_loss(student[masks], teacher, t["in.masks_weight"], n_images=masks.shape[0])
    torch.testing.assert_close(loss, t[f"out.ibot_{kind}.loss"], **TOL)
    loss.backward()
    torch.testing.assert_close(student.grad, t[f"out.ibot_{kind}.grad_student_patch"], **TOL)
    dense = ibot_loss_dense(t["in.student_patch_logits"], t["in.teacher_patch_probs_dense"], masks)
    torch.testing.assert_close(dense, t["out.ibot_dense.loss"], **TOL)


def test_koleo_matches_official_with_gradients(official):
    t, sizes = official
    cls = t["in.student_global_cls"].clone().requires_grad_()
    loss = koleo_multicrop(cls, n_global_crops=sizes["n_global_crops"])
    torch.testing.assert_close(loss, t["out.koleo.multicrop"], **TOL)
    loss.backward()
    torch.testing.assert_close(cls.grad, t["out.koleo.grad_student_global_cls"], **TOL)
    features = t["in.koleo_features"].clone().requires_grad_()
    loss = koleo_loss(features)
    torch.testing.assert_close(loss, t["out.koleo.single"], **TOL)
    loss.backward()
    torch.testing.assert_close(features.grad, t["out.koleo.grad_features"], **TOL)


# ---------------------------------------------------------------- gradients, dtypes, bad input


def test_student_gets_gradients_teacher_targets_do_not():
    teacher_logits = torch.randn(8, 16, requires_grad=True)
    ema = CenterEMA(16)
    targets = [
        softmax_center(teacher_logits, ema.center, 0.04),
        sinkhorn_knopp(teacher_logits, 0.04),
        ema(teacher_logits, 0.1),
    ]
    assert not any(p.requires_grad for p in targets)
    ema.update(teacher_logits)
    assert not ema.center.requires_grad
    student = torch.randn(8, 16, requires_grad=True)
    local = torch.randn(12, 16, requires_grad=True)
    features = torch.randn(8, 5, requires_grad=True)
    global_loss, local_loss = dino_multicrop_loss(student, local, targets[0])
    total = (
        global_loss + local_loss + ibot_loss(student, targets[1], torch.full((8,), 0.25), 2) + koleo_multicrop(features)
    )
    total.backward()
    for grad in (student.grad, local.grad, features.grad):
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0
    assert teacher_logits.grad is None


def test_low_precision_inputs_compute_in_float32():
    student, teacher = torch.randn(6, 10), torch.randn(6, 10).softmax(-1)
    loss32 = dino_multicrop_loss(student, None, teacher)[0]
    loss16 = dino_multicrop_loss(student.bfloat16(), None, teacher.bfloat16())[0]
    assert loss16.dtype == torch.float32 and abs(loss16 - loss32) < 1e-2
    assert sinkhorn_knopp(student.bfloat16(), 0.1).dtype == torch.float32
    assert softmax_center(student.half(), CenterEMA(10).center, 0.1).dtype == torch.float32
    assert koleo_loss(student.half()).dtype == torch.float32


def test_bad_input_is_a_clear_error():
    with pytest.raises(ValueError, match="same-shape"):
        dino_loss([torch.randn(2, 3), torch.randn(3, 3)], [torch.rand(2, 3)])
    with pytest.raises(ValueError, match=r"\(B, K\)"):
        dino_loss([torch.randn(2, 3)], [torch.rand(2, 4)])
    with pytest.raises(ValueError, match="multiple of n_global_crops"):
        dino_multicrop_loss(torch.randn(5, 3), None, torch.rand(5, 3))
    with pytest.raises(ValueError, match="must both be"):
        dino_multicrop_loss(torch.randn(4, 3), None, torch.rand(4, 5))
    with pytest.raises(ValueError, match="not a multiple of B=2"):
        dino_multicrop_loss(torch.randn(4, 3), torch.randn(3, 3), torch.rand(4, 3))
    with pytest.raises(ValueError, match="masks_weight"):
        ibot_loss(torch.randn(4, 3), torch.rand(4, 3), torch.rand(3), 2)
    with pytest.raises(ValueError, match="bool"):
        ibot_masks_weight(torch.ones(2, 3))
    with pytest.raises(ValueError, match="n >= 2"):
        koleo_loss(torch.randn(1, 4))
    with pytest.raises(ValueError, match="n_masked_patches"):
        sinkhorn_knopp(torch.randn(4, 3), 0.1, n_masked_patches=5)
    with pytest.raises(ValueError, match="temperature"):
        sinkhorn_knopp(torch.randn(4, 3), 0.0)
    with pytest.raises(ValueError, match="empty"):
        CenterEMA(3).update(torch.zeros(1, 0, 3))
    with pytest.raises(ValueError, match=r"\(rows, 3\)"):
        CenterEMA(3).update(torch.zeros(2, 4))


# ---------------------------------------------------------------- distributed


def _init_group(tmp_path: Path, rank: int, world_size: int) -> None:
    tdist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=rank, world_size=world_size)


def test_one_process_group_changes_nothing(tmp_path):
    logits, masked = torch.randn(6, 8), torch.randn(5, 8)
    expected = sinkhorn_knopp(logits, 0.07), sinkhorn_knopp(masked, 0.07, n_masked_patches=5)
    ema_plain = CenterEMA(8)
    ema_plain.update(logits)
    _init_group(tmp_path, 0, 1)
    try:
        assert dist.is_distributed() and dist.world_size() == 1
        assert torch.equal(sinkhorn_knopp(logits, 0.07), expected[0])
        assert torch.equal(sinkhorn_knopp(masked, 0.07, n_masked_patches=torch.tensor([5])), expected[1])
        ema = CenterEMA(8)
        ema.update(logits)
        assert torch.equal(ema.center, ema_plain.center)
    finally:
        tdist.destroy_process_group()


def _two_process_worker(rank: int, tmp_path: Path, logits: torch.Tensor, masked: torch.Tensor, split: int) -> None:
    _init_group(tmp_path, rank, 2)
    try:
        half = logits.chunk(2)[rank]  # same rows on both processes: the DINO case
        mine = masked[:split] if rank == 0 else masked[split:]  # different counts: the iBOT case
        dino_ema, ibot_ema = CenterEMA(logits.shape[1]), CenterEMA(logits.shape[1])
        dino_ema.update(half)
        ibot_ema.update(mine.unsqueeze(0))
        result = {
            "dino": sinkhorn_knopp(half, 0.07),
            "ibot": sinkhorn_knopp(mine, 0.07, n_masked_patches=torch.tensor([len(mine)])),
            "dino_center": dino_ema.center,
            "ibot_center": ibot_ema.center,
        }
        torch.save(result, tmp_path / f"rank{rank}.pt")
    finally:
        tdist.destroy_process_group()


@pytest.mark.dist
def test_two_processes_equal_one_process_on_the_whole_batch(tmp_path):
    logits, masked, split = torch.rand(8, 12) * 2 - 1, torch.rand(7, 12) * 2 - 1, 5
    mp.spawn(_two_process_worker, args=(tmp_path, logits, masked, split), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    torch.testing.assert_close(torch.cat([r["dino"] for r in ranks]), sinkhorn_knopp(logits, 0.07), **TOL)
    torch.testing.assert_close(torch.cat([r["ibot"] for r in ranks]), sinkhorn_knopp(masked, 0.07, 3, 7), **TOL)
    whole = CenterEMA(12)
    whole.update(logits)
    expected_ibot = 0.1 * (masked[:split].mean(0) + masked[split:].mean(0)) / 2  # per-process means, unweighted
    for r in ranks:
        torch.testing.assert_close(r["dino_center"], whole.center, **TOL)
        torch.testing.assert_close(r["ibot_center"], expected_ibot.unsqueeze(0), **TOL)
