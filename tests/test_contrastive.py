"""MoCa stage 2's contrastive loss (docs/method.md §3 "Stage 2"): info_nce against a float64 reference,
hard negatives that reach the loss and the gradient, 2 ranks gathered = 1 rank, GradCache = the
plain batch."""

from __future__ import annotations

import math
import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from cmpt.losses import info_nce
from cmpt.recipes.moca import MocaLossConfig
from cmpt.recipes.moca_cl_objective import ContrastiveObjective
from cmpt.train.distributed import all_gather_with_grad
from cmpt.vlm.chat import encode_text_with_images, plain_input
from vlm_fixtures import PATCH_DIM, build_dirs, build_vlm, zero_grads


def _reference(q, t, hn, tau, positives, mask=None):
    """Direct float64 InfoNCE, one query at a time."""
    total = 0.0
    for i in range(q.shape[0]):
        cols = [float(q[i].double() @ t[j].double()) / tau for j in range(t.shape[0])]
        if hn is not None:
            cols += [
                float(q[i].double() @ hn[i, j].double()) / tau
                for j in range(hn.shape[1])
                if mask is None or mask[i, j]
            ]
        lse = math.log(sum(math.exp(c) for c in cols))
        total += lse - cols[int(positives[i])]
    return total / q.shape[0]


def _unit(*shape, seed=0):
    return F.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed)), dim=-1)


@pytest.mark.parametrize("with_hard", [False, True])
def test_info_nce_equals_float64_reference(with_hard):
    q, t = _unit(4, 8, seed=1), _unit(6, 8, seed=2)  # 6 targets: 2 extra in-batch negatives
    hn = _unit(4, 2, 8, seed=3) if with_hard else None
    positives = torch.tensor([0, 1, 2, 3])
    ref = _reference(q, t, hn, 0.03, positives)
    got = info_nce(q, t, hn, 0.03, positives=positives)
    assert got.item() == pytest.approx(ref, rel=1e-6)
    assert info_nce(q, t, hn, 0.03, positives=positives, reduction="sum").item() == pytest.approx(
        4 * ref, rel=1e-6
    )
    mask = torch.tensor([[True, False], [True, True], [False, False], [True, True]])
    if with_hard:
        masked = info_nce(q, t, hn, 0.03, positives=positives, hard_negative_mask=mask)
        assert masked.item() == pytest.approx(_reference(q, t, hn, 0.03, positives, mask), rel=1e-6)


def test_every_hard_negative_changes_the_loss_and_gets_a_gradient():
    q, t = _unit(3, 8, seed=4), _unit(3, 8, seed=5)
    hn = _unit(3, 2, 8, seed=6).requires_grad_()
    base = info_nce(q, t, hn, temperature=0.5)
    base.backward()
    assert (hn.grad.abs().sum(-1) > 0).all()  # each of the 3×2 negatives
    for i in range(3):
        for j in range(2):
            moved = hn.detach().clone()
            moved[i, j] = -moved[i, j]
            assert info_nce(q, t, moved, temperature=0.5).item() != pytest.approx(base.item(), rel=1e-6)


def _toy_loss(w, x, world_rank_slice=None):
    """A toy encoder (linear + normalize) and InfoNCE over pairs ``x = (queries, positives, negatives)``."""
    qx, px, nx = x
    enc = lambda a: F.normalize(a @ w, dim=-1)  # noqa: E731
    q, p, n = enc(qx), enc(px), enc(nx)
    targets, offset = all_gather_with_grad(p)
    pos = torch.arange(q.shape[0]) + offset
    return info_nce(q, targets, n, 0.1, positives=pos, reduction="sum")


def _worker(rank: int, world: int, init_file: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.manual_seed(0)
    w = torch.randn(5, 4, requires_grad=True)
    data = _data()
    b = data[0].shape[0] // world
    local = tuple(x[rank * b : (rank + 1) * b] for x in data)
    loss = _toy_loss(w, local) * world / (world * b)  # the trainer's scale: world / global count
    loss.backward()
    dist.all_reduce(w.grad)
    w.grad /= world  # DDP averages gradients
    total = loss.detach().clone()
    dist.all_reduce(total)
    if rank == 0:
        torch.save({"grad": w.grad, "loss": total / world}, out)
    dist.destroy_process_group()


def _data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(8, 5, generator=g), torch.randn(8, 5, generator=g), torch.randn(8, 2, 5, generator=g)


def test_two_ranks_gathered_equal_one_rank():
    torch.manual_seed(0)
    w = torch.randn(5, 4, requires_grad=True)
    loss = _toy_loss(w, _data()) / 8
    loss.backward()
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "r0.pt")
        mp.spawn(_worker, args=(2, os.path.join(d, "init"), out), nprocs=2, join=True)
        got = torch.load(out)
    assert got["loss"].item() == pytest.approx(loss.item(), rel=1e-5)
    torch.testing.assert_close(got["grad"], w.grad, rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def vlm(tmp_path_factory):
    return build_vlm(build_dirs(tmp_path_factory.mktemp("cl")), "qwen2").train()


def _pair_batch(vlm, b=3, k=2, seed=0):
    """Queries (text + image), positives (text), k negatives (text) packed as collate_pairs does."""
    g = torch.Generator().manual_seed(seed)
    tok, rows, grids, per_input = vlm.tokenizer, [], [], []
    texts = [(f"Represent the chart {i}.", 1) for i in range(b)]
    texts += [(f"caption number {i} of a bar chart", 0) for i in range(b)]
    texts += [(f"a distractor {i}-{j} about pie charts", 0) for i in range(b) for j in range(k)]
    ids = []
    for text, n_img in texts:
        ids.append(encode_text_with_images(plain_input(text, n_img), tok, [4] * n_img))
        per_input.append(n_img)
        for _ in range(n_img):
            rows.append(torch.randn(16, PATCH_DIM, generator=g))
            grids.append((4, 4))
    lengths = [len(x) for x in ids]
    return {
        "input_ids": torch.cat(ids),
        "cu_seqlens": torch.tensor([0, *lengths]).cumsum(0).int(),
        "patches": torch.cat(rows),
        "grid_hw": torch.tensor(grids),
        "images_per_sample": torch.tensor(per_input),
        "num_pairs": b,
        "num_hard_negatives": k,
        "neg_mask": torch.ones(b, k, dtype=torch.bool),
    }


def test_grad_cache_equals_the_plain_batch(vlm):
    batch = _pair_batch(vlm)
    results = []
    for chunk in (0, 4):
        obj = ContrastiveObjective(vlm, MocaLossConfig(grad_cache_chunk=chunk))
        zero_grads(vlm)
        out = obj(batch)
        assert out["cl_count"] == 3
        out["cl_sum"].backward()
        grads = {n: p.grad.clone() for n, p in vlm.named_parameters() if p.grad is not None}
        results.append((out["cl_sum"].detach(), grads))
    (l0, g0), (l1, g1) = results
    torch.testing.assert_close(l1, l0, rtol=1e-5, atol=1e-6)
    assert g0.keys() == g1.keys() and len(g0) > 0
    for name in g0:  # relative to the gradient's scale (τ = 0.03 makes them large)
        assert (g1[name] - g0[name]).abs().max() <= 1e-5 * g0[name].abs().max().clamp_min(1e-6), name
    zero_grads(vlm)


def test_repeated_pairs_are_neither_queries_nor_negatives(vlm):
    """A loader that lost bad pairs repeats good ones (pair_mask False): the real pairs' loss."""
    obj = ContrastiveObjective(vlm, MocaLossConfig())
    padded = dict(_pair_batch(vlm, b=3), pair_mask=torch.tensor([True, True, False]))
    with torch.no_grad():
        got = obj(padded)
        ref = obj(_pair_batch(vlm, b=2))
    assert got["cl_count"] == ref["cl_count"] == 2
    torch.testing.assert_close(got["cl_sum"], ref["cl_sum"], rtol=1e-5, atol=1e-6)
    q, t = _unit(2, 8, seed=7), _unit(3, 8, seed=8)
    masked = info_nce(q, t, target_mask=torch.tensor([True, True, False]))
    torch.testing.assert_close(masked, info_nce(q, t[:2]))


def test_every_trainable_parameter_of_the_cl_stage_gets_a_gradient(tmp_path):
    """DDP needs every trainable parameter in the graph: an untied LM head (which the contrastive
    loss never reads) asked for by ``stage.trainable`` stays frozen in stage 2."""
    from cmpt.recipes import load_recipe

    build_vlm(build_dirs(tmp_path / "m"), "llama").save_pretrained(tmp_path / "vlm")  # untied head
    sets = [
        f"model.init={tmp_path / 'vlm'}",
        "stage.trainable=[vision, merger, llm, lm_head]",
        "data.path=unused",
    ]
    cfg, task_cls = load_recipe("tiny/moca_cl", sets)
    task = task_cls(cfg)
    assert task.backbone.parts()["lm_head"] and not any(
        p.requires_grad for p in task.backbone.parts()["lm_head"]
    )
    task.model(_pair_batch(task.backbone))["cl_sum"].backward()
    trainable = [n for n, p in task.model.named_parameters() if p.requires_grad]
    assert (
        trainable
        and [n for n, p in task.model.named_parameters() if p.requires_grad and p.grad is None] == []
    )


def test_hard_negative_mask_rows_match_the_real_pairs(vlm):
    """With a repeated pair in the middle, each real query keeps its own row of neg_mask."""
    obj = ContrastiveObjective(vlm, MocaLossConfig())
    nm, real = torch.tensor([[True, False], [True, True], [False, True]]), torch.tensor([True, False, True])
    batch = dict(_pair_batch(vlm, b=3), pair_mask=real, neg_mask=nm)
    with torch.no_grad():
        got = obj(batch)["cl_sum"]
        emb = obj.embed(batch)
        q, t, n = emb[:3], emb[3:6], emb[6:].reshape(3, 2, -1)
        rows = torch.tensor([0, 2])
        ref = info_nce(q[rows], t, n[rows], obj.loss.temperature, positives=rows,
                       hard_negative_mask=nm[rows], target_mask=real, reduction="sum")  # fmt: skip
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
