"""The demo's tiny pretraining runs through cmpt.train.Trainer (cmpt.demo.pretrain_run), not a loop of
its own."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, Dinov2Model

from cmpt.demo.lm_pretrain import LMPretrainTask, held_out_loss, lm_batch
from cmpt.demo.pretrain_run import ShuffledBatches, train_into
from cmpt.demo.tiny_lm import build_tiny_causal_lm, default_corpus, train_tokenizer
from cmpt.demo.tiny_models import QUICK
from cmpt.demo.vit_pretrain import HEADS, VitPretrainTask


def _records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_shuffled_batches_cover_each_epoch_split_ranks_and_resume():
    def ids(idx, index):
        return {"idx": idx, "index": index}

    one = ShuffledBatches(10, 4, ids, seed=3)
    it = iter(one)
    first = [next(it)["idx"] for _ in range(5)]  # 20 items = 2 epochs
    flat = [i for b in first for i in b]
    assert sorted(flat[:10]) == list(range(10)) and sorted(flat[10:]) == list(range(10))
    assert flat[:10] != flat[10:]  # a new permutation per epoch

    ranks = [iter(ShuffledBatches(10, 4, ids, seed=3, rank=r, world_size=2)) for r in range(2)]
    assert [next(ranks[i % 2])["idx"] for i in range(4)] == first[:4]  # rank r: batches r, r+2, ...

    state = one.state_dict()
    rest = [next(it)["idx"] for _ in range(3)]
    again = ShuffledBatches(10, 4, ids, seed=3)
    again.load_state_dict(state)
    assert [b["idx"] for b, _ in zip(again, range(3))] == rest
    with pytest.raises(ValueError, match="rank"):
        ShuffledBatches(10, 4, ids, rank=1, world_size=2).load_state_dict(state)


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(default_corpus(300), vocab_size=320)


def test_lm_pretraining_goes_through_the_trainer(tmp_path, tok):
    texts = default_corpus(64, seed=1)
    seqs = [torch.tensor(tok(t, add_special_tokens=False)["input_ids"]) for t in texts]
    lm = build_tiny_causal_lm(tok, hidden_size=32, num_layers=1, intermediate_size=64, seed=0)
    task = LMPretrainTask(lm, tok, seqs, batch_size=8, seed=0)
    before = held_out_loss(task.model, seqs[:16], tok.pad_token_id)
    task.model.train()
    summary = train_into(task, tmp_path, steps=12, lr=3e-3, weight_decay=0.0, seed=0, name="lm")
    assert summary["step"] == 12

    run = tmp_path / "pretrain"  # the Trainer's run directory: its config and metrics, no checkpoint
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    assert cfg["optim"]["schedule"] == "cosine" and cfg["optim"]["warmup_ratio"] == 0.1
    assert cfg["train"]["steps"] == 12 and not cfg["train"]["progress"] and not cfg["train"]["tensorboard"]
    recs = _records(run)
    assert recs[-1]["step"] == 12 and "loss/lm" in recs[-1] and recs[-1]["loss"] < recs[0]["loss"]
    lrs = [r["lr/lm"] for r in recs]  # the trainer's schedule: warmup from 0, then cosine decay
    assert lrs[0] == 0.0 and max(lrs) == pytest.approx(3e-3, rel=0.05) and lrs[-1] < 0.2 * max(lrs)
    assert not (run / "checkpoints").exists() and not (tmp_path / "final").exists()
    assert held_out_loss(task.model.cpu(), seqs[:16], tok.pad_token_id) < before

    saved = AutoModelForCausalLM.from_pretrained(tmp_path).eval()  # save_final: an HF directory
    batch = lm_batch(seqs[:4], tok.pad_token_id)
    with torch.no_grad():
        total, count = task.model.eval()(batch["input_ids"], batch["attention_mask"], batch["labels"])
        ref = saved(**{k: batch[k] for k in ("input_ids", "attention_mask", "labels")})
    assert count == task.loss_counts(batch)["lm"]
    torch.testing.assert_close(total / count, ref.loss, atol=1e-5, rtol=1e-5)  # = HF's labels= loss


def test_vit_pretraining_goes_through_the_trainer(tmp_path):
    s = dataclasses.replace(QUICK, vit_size=28, vit_hidden=32, vit_layers=1, vit_heads=2, vit_batch=8)
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (16, 3, 28, 28), generator=gen, dtype=torch.uint8)
    targets = torch.stack([torch.randint(0, n, (16,), generator=gen) for _, n in HEADS], dim=1)
    task = VitPretrainTask(images, targets, s, seed=0)
    summary = train_into(task, tmp_path, steps=20, lr=3e-3, weight_decay=0.05, seed=0, name="vit")

    recs = _records(tmp_path / "pretrain")
    assert recs[-1]["step"] == 20 and {f"loss/{name}" for name, _ in HEADS} <= recs[-1].keys()
    assert summary["loss"] < recs[0]["loss"]  # it fits 16 images
    vit = Dinov2Model.from_pretrained(tmp_path)  # save_final: the ViT alone, fixed resolution
    assert vit.config.image_size == 28
    pre = json.loads((tmp_path / "preprocessor_config.json").read_text())
    assert pre["size"] == {"height": 28, "width": 28} and not pre["do_center_crop"]
