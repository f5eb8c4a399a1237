"""A training step's forward and backward never wait for the device (docs/method.md §7 "Batches
on the host"), checked on the CPU with the meta device standing in for the GPU
(:mod:`device_audit`): the model and the trainer-moved tensors on ``meta``, the task's
``host_keys`` on the host, placed by the trainer's own :func:`cmpt.train.distributed.to_device`.
A read-back raises there; host→device copies outside :mod:`cmpt.host_tensor` are recorded."""

from __future__ import annotations

from importlib.util import find_spec
from pathlib import Path

import pytest
import torch

import cmpt
from cmpt.host_tensor import host_tensor, to_device_async
from cmpt.losses import next_token_loss
from cmpt.recipes.comp import CompTask, LossConfig
from cmpt.recipes.comp_objective import CompObjective
from cmpt.recipes.moca import MocaLossConfig, MocaTask
from cmpt.recipes.moca_cl_objective import ContrastiveObjective
from cmpt.recipes.moca_objective import MocaObjective
from cmpt.train.distributed import PlacedBatch, to_device
from device_audit import HostCopies, meta_autocast
from test_contrastive import _pair_batch
from test_moca_objective import DOCS, _backbone, doc_batch
from vlm_fixtures import THREE, build_dirs, build_vlm, make_batch

META = torch.device("meta")


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    return build_dirs(tmp_path_factory.mktemp("sync_free"))


def _meta_step(objective: torch.nn.Module, batch: dict, host_keys: frozenset, monkeypatch) -> tuple:
    """Counts of ``objective`` on the CPU, then two forward + backward passes on meta; the counts
    and the host copies of the second one (a first step's cached tables are copied once)."""
    with torch.no_grad():
        ref = {k: v for k, v in objective(batch).items() if isinstance(v, int)}
    objective.to(META)
    placed = to_device(batch, META, keep=host_keys)
    with meta_autocast(monkeypatch):
        for audit in (HostCopies(), HostCopies()):  # audited: the second step (caches filled)
            with audit:
                out = objective(placed)
                sum(v for v in out.values() if torch.is_tensor(v)).backward()
    counts = {k: v for k, v in out.items() if isinstance(v, int)}
    grads = [p.grad for p in objective.parameters() if p.grad is not None]
    assert grads and all(g.is_meta for g in grads)
    return counts, ref, audit.found


def test_the_audit_sees_read_backs_and_host_copies():
    """The checks below can fail: a device read-back raises on meta and host copies are recorded,
    except those of cmpt.host_tensor."""
    with HostCopies() as audit:
        torch.arange(3).to(META)
        torch.zeros(4, device=META)[torch.tensor([0, 1])]
        host_tensor([1, 2], META)
        to_device_async(torch.arange(3), META)
    assert len(audit.found) == 2 and all("test_sync_free" not in f for f in audit.found)
    hidden, weight = torch.zeros(6, 4, device=META), torch.zeros(10, 4, device=META)
    labels = torch.tensor([-100, 1, 2, -100, 3, -100])
    with pytest.raises(NotImplementedError):  # labels on the device: finding the rows reads back
        next_token_loss(hidden, labels.to(META), weight, shift=False)
    loss, count = next_token_loss(hidden, labels, weight, shift=False)
    assert count == 3 and loss.is_meta


def test_comp_step_reads_nothing_back(dirs, monkeypatch):
    vlm = build_vlm(dirs, "qwen2").train()
    batch = make_batch(vlm, THREE, seed=3)
    counts, ref, found = _meta_step(CompObjective(vlm, LossConfig()), batch, CompTask.host_keys, monkeypatch)
    assert counts == ref and ref["align_count"] == 2 and ref["lm_count"] > 0
    assert found == []


def test_moca_cpt_step_reads_nothing_back(dirs, monkeypatch):
    vlm = _backbone(dirs, "llama")
    batch = doc_batch(vlm, DOCS)
    objective = MocaObjective(vlm, MocaLossConfig())
    counts, ref, found = _meta_step(objective, batch, MocaTask.host_keys, monkeypatch)
    assert counts == ref and ref["mae_count"] > 0 and ref["mlm_count"] > 0
    assert found == []


@pytest.mark.parametrize("chunk", [0, 4])
def test_moca_cl_step_reads_nothing_back(dirs, monkeypatch, chunk):
    vlm = build_vlm(dirs, "qwen2").train()
    batch = dict(_pair_batch(vlm, b=3), pair_mask=torch.tensor([True, True, False]))
    objective = ContrastiveObjective(vlm, MocaLossConfig(grad_cache_chunk=chunk))
    counts, ref, found = _meta_step(objective, batch, MocaTask.host_keys, monkeypatch)
    assert counts == ref == {"cl_count": 2}
    assert found == []


def test_to_device_moves_nested_containers_and_keeps_only_kept_keys():
    t = torch.ones(2)
    placed = to_device({"a": {"b": t}, "c": [t, (t,)], "labels": t, "ids": t}, META, keep={"ids"})
    assert placed["a"]["b"].is_meta and placed["c"][0].is_meta and placed["c"][1][0].is_meta
    assert isinstance(placed["c"], list) and isinstance(placed["c"][1], tuple)
    assert placed["labels"].is_meta and placed["ids"] is t


def test_ddp_and_fsdp_input_moving_leaves_a_placed_batch_alone():
    """DDP (with device_ids) and FSDP2's root move the tensors of their inputs' dicts to the device
    with ``torch.distributed.utils._to_kwargs``; a PlacedBatch is not a dict and stays as placed."""
    from torch.distributed.utils import _to_kwargs

    batch = {"patches": torch.ones(2, 3), "cu_seqlens": torch.tensor([0, 2])}
    placed = to_device(batch, META, keep={"cu_seqlens"})
    assert isinstance(placed, PlacedBatch) and dict(placed).keys() == batch.keys()
    placed["extra"] = 1  # a task may still add to its batch, as to the dict it got before
    del placed["extra"]
    assert placed["patches"].is_meta and placed["cu_seqlens"].device.type == "cpu"
    (args,), _ = _to_kwargs((placed,), {}, META, False)
    assert args[0] is placed and placed["cu_seqlens"].device.type == "cpu"
    (args,), _ = _to_kwargs((dict(placed),), {}, META, False)
    assert args[0]["cu_seqlens"].is_meta  # what a plain dict would have gone through


@pytest.mark.skipif(
    find_spec("transformers.vision_utils") is None, reason="transformers < 5.17: the tower reads grids back"
)
@pytest.mark.parametrize("arch", ["qwen2_vl", "qwen2_5_vl"])
@pytest.mark.parametrize("tower_attention", ["auto", None])
def test_qwen_vl_backbone_reads_nothing_back(tmp_path, monkeypatch, arch, tower_attention):
    """QwenVLBackbone, vision tower included (cmpt's packed attention or transformers' own): the
    tower's positions, segments and windows come precomputed from the host's grids
    (:mod:`cmpt.embed.vision_inputs`)."""
    from cmpt.embed.qwen_vl import QwenVLBackbone
    from test_qwen_vl_backbone import SAMPLES, build_checkpoint
    from test_qwen_vl_backbone import batch as qwen_batch

    bb = QwenVLBackbone.from_pretrained(build_checkpoint(arch, tmp_path / arch)).train()
    bb.set_vision_attention(tower_attention)
    b = qwen_batch(bb, SAMPLES)
    bb.to(META)
    placed = to_device(b, META, keep=MocaTask.host_keys)
    with meta_autocast(monkeypatch):
        for audit in (HostCopies(), HostCopies()):
            with audit:
                out = bb(placed["input_ids"], placed["cu_seqlens"], patches=placed["patches"],
                         grid_hw=placed["grid_hw"], images_per_sample=placed["images_per_sample"],
                         attention="bidirectional")  # fmt: skip
                out.hidden.float().sum().backward()
    assert out.hidden.is_meta and out.vision_per_sample == [6, 0, 7]
    assert all(p.grad is not None for p in bb.visual.parameters() if p.requires_grad)
    assert audit.found == []


def _on_cuda(batch: dict, keep: frozenset) -> PlacedBatch:
    """``batch`` placed as the trainer places it on CUDA, its host keys pinned (the loader's)."""
    batch = {k: v.pin_memory() if torch.is_tensor(v) and k in keep else v for k, v in batch.items()}
    return to_device(batch, torch.device("cuda"), keep=keep)


def _cuda_waits(step) -> tuple[list[str], list[str]]:
    """``(cmpt's lines, all lines)`` that made the host wait during ``step()`` (after a warm-up
    call), as ``set_sync_debug_mode("warn")`` reports them."""
    import warnings

    step()
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as records:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    package = Path(cmpt.__file__).resolve().parent
    waits = [(Path(r.filename).resolve(), r.lineno) for r in records]
    return [f"{f}:{n}" for f, n in waits if f.is_relative_to(package)], [f"{f}:{n}" for f, n in waits]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_comp_step_never_waits_in_cmpt_code(dirs):
    """On a GPU, under ``set_sync_debug_mode("warn")``: no line of cmpt makes the host wait during a
    CoMP micro-batch's forward and backward placed as the trainer places it (after a warm-up)."""
    vlm = build_vlm(dirs, "qwen2").train().cuda()
    placed = _on_cuda(make_batch(vlm, THREE, seed=3), CompTask.host_keys)
    objective = CompObjective(vlm, LossConfig())

    def step() -> None:
        out = objective(placed)
        (out["lm_sum"] + out["align_sum"]).backward()

    ours, _ = _cuda_waits(step)
    assert ours == []


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_qwen_vl_step_never_waits_in_cmpt_or_the_tower_inputs(tmp_path):
    """On a GPU: a Qwen2.5-VL backbone's forward and backward, placed as the trainer places MoCa's
    batches, waits in no line of cmpt nor of transformers' ``vision_utils`` (precomputed)."""
    from cmpt.embed.qwen_vl import QwenVLBackbone
    from test_qwen_vl_backbone import SAMPLES, build_checkpoint
    from test_qwen_vl_backbone import batch as qwen_batch

    bb = QwenVLBackbone.from_pretrained(build_checkpoint("qwen2_5_vl", tmp_path / "q")).train().cuda()
    placed = _on_cuda(qwen_batch(bb, SAMPLES), MocaTask.host_keys)

    def step() -> None:
        out = bb(placed["input_ids"], placed["cu_seqlens"], patches=placed["patches"],
                 grid_hw=placed["grid_hw"], images_per_sample=placed["images_per_sample"],
                 attention="bidirectional")  # fmt: skip
        out.hidden.float().sum().backward()

    ours, waits = _cuda_waits(step)
    assert ours == [] and not [w for w in waits if "vision_utils" in w]
