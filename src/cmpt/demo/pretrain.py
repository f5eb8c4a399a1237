"""Pretraining of the demo's tiny starting points through cmpt's own :class:`~cmpt.train.Trainer`.

CoMP starts from a vision model pretrained at one fixed resolution and a pretrained LLM
(docs/method.md §2.1); the offline demo makes both here, as two ordinary recipes of the generic
trainer (docs/method.md §6): the trainer owns the optimizer, the schedule (linear warmup over 10 %
of the steps, then cosine down to 10 % of the peak), clipping, the loss normalization and the logs.

* :class:`VitPretrainTask`: a Hugging Face ``Dinov2Model`` trained from scratch by supervised
  multi-task classification of shape scenes at a fixed square resolution (largest shape, its colour,
  the number of shapes − 2), one linear head per task on [CLS, mean of the patch tokens].
* :class:`LMPretrainTask`: a small causal LM trained on the training conversations (chat-templated
  text); the loss is :func:`cmpt.losses.next_token_loss` on the LM body's hidden states.

:func:`train_into` runs a task in ``<part>/pretrain/`` (``config.yaml``, ``metrics.jsonl``) and moves
the task's final output (``save_final``: a Hugging Face directory) into ``<part>/``.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn

from ..losses import next_token_loss
from ..train import LossTerms, OptimConfig, RunConfig, TrainConfig, Trainer
from ..vision.convert import IMAGENET_MEAN, IMAGENET_STD

if TYPE_CHECKING:
    from .tiny_models import TinySizes

__all__ = ["HEADS", "CausalLMObjective", "LMPretrainTask", "SceneClassifier", "ShuffledBatches"]
__all__ += ["VitPretrainTask", "accuracy", "chat_texts", "held_out_loss", "lm_batch", "normalize"]
__all__ += ["pretrain_lm", "pretrain_vit", "scene_arrays", "train_into"]

HEADS = (("shape", 3), ("colour", 8), ("count", 4))  # the ViT's classification tasks and classes
RUN_DIR = "pretrain"  # the trainer's run directory inside a built part


class ShuffledBatches:
    """Endless batches of a fixed dataset of ``n`` items: a fresh permutation per epoch (seeded by
    ``(seed, epoch)``), cut into ``batch_size`` slices that run across epoch boundaries. Rank ``r`` of
    ``W`` gets global batches ``r, r + W, ...``; ``make_batch(indices, batch_index)`` builds each.
    The state is the number of batches this rank has yielded."""

    def __init__(
        self,
        n: int,
        batch_size: int,
        make_batch: Callable[[list[int], int], dict],
        *,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if n < 1 or batch_size < 1:
            raise ValueError(f"need n >= 1 and batch_size >= 1, got {n}, {batch_size}")
        self.n, self.batch_size, self.make_batch = n, batch_size, make_batch
        self.seed, self.rank, self.world = seed, rank, world_size
        self.next_local = 0
        self._perm: tuple[int, list[int]] | None = None

    def _permutation(self, epoch: int) -> list[int]:
        if self._perm is None or self._perm[0] != epoch:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm = (epoch, torch.randperm(self.n, generator=gen).tolist())
        return self._perm[1]

    def indices(self, batch_index: int) -> list[int]:
        """Dataset indices of global batch ``batch_index``."""
        out: list[int] = []
        pos = batch_index * self.batch_size
        while len(out) < self.batch_size:
            epoch, offset = divmod(pos + len(out), self.n)
            take = min(self.batch_size - len(out), self.n - offset)
            out += self._permutation(epoch)[offset : offset + take]
        return out

    def __iter__(self) -> Iterator[dict]:
        while True:
            index = self.rank + self.world * self.next_local
            self.next_local += 1
            yield self.make_batch(self.indices(index), index)

    def state_dict(self) -> dict:
        return {"next_local": self.next_local, "rank": self.rank, "world": self.world}

    def load_state_dict(self, d: dict) -> None:
        if (d["rank"], d["world"]) != (self.rank, self.world):
            raise ValueError(f"loader state of rank {d['rank']}/{d['world']}, not {self.rank}/{self.world}")
        self.next_local = int(d["next_local"])


def train_into(
    task: Any, out: Path, *, steps: int, lr: float, weight_decay: float, seed: int, name: str
) -> dict[str, Any]:
    """Train ``task`` with the :class:`~cmpt.train.Trainer` (AdamW, 10 % warmup then cosine down to 10 % of
    ``lr``, clipping at 1, fp32, no progress bar or TensorBoard) in ``out/pretrain/``; move its
    ``final/`` into ``out``.

    The checkpoint is removed afterwards: a part is built in a temporary directory and never resumed.
    Returns the trainer's summary.
    """
    run_dir = out / RUN_DIR
    run = RunConfig(dir=str(run_dir), seed=seed, name=name)
    optim = OptimConfig(
        lr=lr, weight_decay=weight_decay, warmup_ratio=0.1, schedule="cosine", min_lr_ratio=0.1, clip_grad=1.0
    )
    train = TrainConfig(
        steps=steps,
        log_every=max(1, steps // 10),
        keep_last=1,
        precision="fp32",
        tensorboard=False,
        progress=False,
    )
    summary = Trainer(run, optim, train, task).fit()
    final = Path(summary["final"])
    for item in final.iterdir():
        os.replace(item, out / item.name)
    final.rmdir()
    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
    print(f"  {name}: {summary['step']} steps with cmpt.train.Trainer, last loss {summary['loss']:.3f}")
    return summary


# ----------------------------------------------------------------------------- vision
def scene_arrays(json_path: Path, size: int) -> tuple[Tensor, Tensor]:
    """Scenes resized to ``size²`` (PIL bicubic, as the fixed-resolution processor) as uint8
    (n, 3, size, size) and targets (n, 3): largest shape, its colour, number of shapes − 2."""
    from .synth_scenes import COLORS

    colours = sorted(COLORS)
    images, targets = [], []
    for rec in json.loads(json_path.read_text()):
        img = Image.open(json_path.parent / rec["image"]).convert("RGB")
        images.append(np.asarray(img.resize((size, size), Image.Resampling.BICUBIC)).transpose(2, 0, 1))
        shapes = rec["meta"]["shapes"]
        targets.append([rec["meta"]["label"], colours.index(shapes[0]["color"]), len(shapes) - 2])
    return torch.from_numpy(np.stack(images)), torch.tensor(targets)


def normalize(x: Tensor) -> Tensor:
    """uint8 images → ImageNet-normalized float."""
    mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
    return (x.float() / 255.0 - mean) / std


class SceneClassifier(nn.Module):
    """HF Dinov2Model + one linear head per task of :data:`HEADS` on [CLS, mean of patch tokens]."""

    def __init__(self, vit: nn.Module, dim: int) -> None:
        super().__init__()
        self.vit = vit
        self.heads = nn.ModuleList(nn.Linear(2 * dim, n) for _, n in HEADS)

    def forward(self, pixels: Tensor) -> list[Tensor]:
        h = self.vit(pixel_values=pixels).last_hidden_state
        feats = torch.cat([h[:, 0], h[:, 1:].mean(1)], dim=-1)
        return [head(feats) for head in self.heads]


@torch.no_grad()
def accuracy(model: SceneClassifier, x: Tensor, y: Tensor) -> dict[str, float]:
    """Top-1 of every head (model in eval mode, on the CPU)."""
    model.eval()
    outs = [model(normalize(b)) for b in x.split(128)]
    return {
        name: float((torch.cat([o[i] for o in outs]).argmax(1) == y[:, i]).float().mean())
        for i, (name, _) in enumerate(HEADS)
    }


class VitPretrainTask:
    """Supervised multi-task scene classification at one fixed resolution (a :class:`~cmpt.train.Task`).

    Loss terms: one cross-entropy per head (summed over the batch, counted per sample), weight 1
    each. Every other batch is mirrored left-right (no target changes).
    """

    def __init__(self, images: Tensor, targets: Tensor, s: TinySizes, seed: int = 0) -> None:
        import transformers as tf

        self.images, self.targets, self.s, self.seed = images, targets, s, seed
        cfg = tf.Dinov2Config(
            hidden_size=s.vit_hidden,
            num_hidden_layers=s.vit_layers,
            num_attention_heads=s.vit_heads,
            mlp_ratio=4,
            image_size=s.vit_size,
            patch_size=14,
            layerscale_value=0.1,
            drop_path_rate=0.0,
        )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.model = SceneClassifier(tf.Dinov2Model(cfg), s.vit_hidden).train()

    def param_groups(self) -> list[dict]:
        return [{"name": "vit_and_heads", "params": list(self.model.parameters())}]  # lr: optim.lr

    def fsdp_units(self) -> list[nn.Module]:
        return list(self.model.vit.encoder.layer)

    def _batch(self, idx: list[int], index: int) -> dict:
        x = self.images[idx]
        return {
            "pixels": x.flip(-1) if index % 2 else x,
            "targets": self.targets[idx],
            "num_samples": len(idx),
        }

    def build_loader(self, rank: int, world_size: int) -> ShuffledBatches:
        n, bs = len(self.images), self.s.vit_batch
        return ShuffledBatches(n, bs, self._batch, seed=self.seed, rank=rank, world_size=world_size)

    def loss_counts(self, batch: dict) -> dict[str, int]:
        return {name: int(batch["targets"].shape[0]) for name, _ in HEADS}

    def compute_loss(self, model: nn.Module, batch: dict) -> LossTerms:
        logits, t = model(normalize(batch["pixels"])), batch["targets"]
        sums = {
            name: nn.functional.cross_entropy(lg, t[:, i], reduction="sum")
            for i, ((name, _), lg) in enumerate(zip(HEADS, logits))
        }
        return LossTerms(sums, self.loss_counts(batch), {name: 1.0 for name, _ in HEADS})

    def save_final(self, model: nn.Module, out_dir: Path) -> None:
        """The ViT alone as an HF directory, with a fixed-resolution (DINOv2-style) preprocessor config."""
        model.vit.save_pretrained(str(out_dir))
        side = {"height": self.s.vit_size, "width": self.s.vit_size}
        pre = dict(image_processor_type="BitImageProcessor", size=side, crop_size=side, do_center_crop=False)
        pre |= dict(resample=3, image_mean=list(IMAGENET_MEAN), image_std=list(IMAGENET_STD))
        (out_dir / "preprocessor_config.json").write_text(json.dumps(pre, indent=1) + "\n")


def pretrain_vit(out: Path, data: Path, s: TinySizes, seed: int) -> dict:
    """Train the fixed-resolution ViT on ``data/scenes`` into ``out`` (HF Dinov2 + ``pretrain.json``)."""
    x_tr, y_tr = scene_arrays(data / "scenes" / "train.json", s.vit_size)
    x_va, y_va = scene_arrays(data / "scenes" / "val.json", s.vit_size)
    task = VitPretrainTask(x_tr, y_tr, s, seed)
    summary = train_into(
        task, out, steps=s.vit_steps, lr=s.vit_lr, weight_decay=0.05, seed=seed, name="ViT pretraining"
    )
    model = task.model.cpu()
    chance = {name: 1.0 / n for name, n in HEADS}
    val, train = accuracy(model, x_va, y_va), accuracy(model, x_tr[:512], y_tr[:512])
    stats = {
        "resolution": s.vit_size,
        "val_accuracy": sum(val.values()) / len(val),  # mean over the tasks
        "chance_accuracy": sum(chance.values()) / len(chance),
        "val": val,
        "train": train,
        "chance": chance,
        "n_train": len(x_tr),
        "n_val": len(x_va),
        "final_loss": summary["loss"],
    }
    (out / "pretrain.json").write_text(json.dumps(stats, indent=1) + "\n")
    print(
        f"  ViT @ {s.vit_size}px, val accuracy: shape {val['shape']:.3f} (chance 0.333), "
        f"colour {val['colour']:.3f} (0.125), count {val['count']:.3f} (0.25)"
    )
    return stats


# ----------------------------------------------------------------------------- language model
def chat_texts(json_path: Path, tokenizer: Any = None) -> list[str]:
    """The conversations of a LLaVA JSON as text: raw turns, or chat-templated with ``tokenizer``."""
    texts = []
    for rec in json.loads(json_path.read_text()):
        msgs = [
            {
                "role": "user" if t["from"] == "human" else "assistant",
                "content": t["value"].replace("<image>\n", ""),
            }
            for t in rec["conversations"]
        ]
        if tokenizer is None:
            texts.extend(m["content"] for m in msgs)
        else:
            texts.append(tokenizer.apply_chat_template(msgs, tokenize=False))
    return texts


def lm_batch(seqs: list[Tensor], pad_id: int) -> dict:
    """Right-padded ``input_ids`` / ``attention_mask`` and ``labels`` (−100 on padding)."""
    ids = nn.utils.rnn.pad_sequence(seqs, batch_first=True, padding_value=pad_id)
    mask = nn.utils.rnn.pad_sequence([torch.ones_like(s) for s in seqs], batch_first=True)
    labels = ids.masked_fill(mask == 0, -100)
    n = sum(len(s) for s in seqs)
    return {
        "input_ids": ids,
        "attention_mask": mask,
        "labels": labels,
        "num_samples": len(seqs),
        "num_tokens": n,
    }


class CausalLMObjective(nn.Module):
    """A Hugging Face causal LM whose forward returns ``(summed next-token loss, token count)``: the
    LM body's hidden states (``get_decoder()``) through :func:`cmpt.losses.next_token_loss` with the
    LM head's weights, never a sequence × vocabulary logits tensor."""

    def __init__(self, lm: nn.Module) -> None:
        super().__init__()
        self.lm = lm

    def forward(self, input_ids: Tensor, attention_mask: Tensor, labels: Tensor) -> tuple[Tensor, int]:
        hidden = self.lm.get_decoder()(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        head = self.lm.get_output_embeddings()
        return next_token_loss(hidden, labels, head.weight, head.bias)


class LMPretrainTask:
    """Causal-LM pretraining on tokenized texts (a :class:`~cmpt.train.Task`; loss term ``lm``,
    normalized by the number of predicted tokens of the step)."""

    def __init__(
        self, lm: nn.Module, tokenizer: Any, seqs: list[Tensor], *, batch_size: int, seed: int = 0
    ) -> None:
        self.model = CausalLMObjective(lm).train()
        self.tokenizer, self.seqs, self.batch_size, self.seed = tokenizer, seqs, batch_size, seed

    def param_groups(self) -> list[dict]:
        return [{"name": "lm", "params": list(self.model.parameters())}]  # lr: optim.lr

    def fsdp_units(self) -> list[nn.Module]:
        return list(self.model.lm.get_decoder().layers)

    def _batch(self, idx: list[int], index: int) -> dict:
        return lm_batch([self.seqs[i] for i in idx], self.tokenizer.pad_token_id)

    def build_loader(self, rank: int, world_size: int) -> ShuffledBatches:
        n, bs = len(self.seqs), self.batch_size
        return ShuffledBatches(n, bs, self._batch, seed=self.seed, rank=rank, world_size=world_size)

    def loss_counts(self, batch: dict) -> dict[str, int]:
        return {"lm": int((batch["labels"][:, 1:] != -100).sum())}

    def compute_loss(self, model: nn.Module, batch: dict) -> LossTerms:
        total, count = model(batch["input_ids"], batch["attention_mask"], batch["labels"])
        return LossTerms({"lm": total}, {"lm": count}, {"lm": 1.0})

    def save_final(self, model: nn.Module, out_dir: Path) -> None:
        """The LM and its tokenizer as an HF directory."""
        from .tiny_lm import save_tiny_lm

        save_tiny_lm(model.lm, self.tokenizer, out_dir)


@torch.no_grad()
def held_out_loss(model: CausalLMObjective, seqs: list[Tensor], pad_id: int, batch_size: int = 16) -> float:
    """Mean over batches of ``batch_size`` texts of the per-token next-token loss (eval mode)."""
    model.eval()
    losses = []
    for i in range(0, len(seqs), batch_size):
        b = lm_batch(seqs[i : i + batch_size], pad_id)
        total, count = model(b["input_ids"], b["attention_mask"], b["labels"])
        losses.append(float(total) / max(1, count))
    return sum(losses) / len(losses)


def pretrain_lm(out: Path, data: Path, s: TinySizes, seed: int) -> dict:
    """BPE tokenizer + Qwen2 causal LM pretrained on the training conversations (text only) into ``out``."""
    from .tiny_lm import build_tiny_causal_lm, train_tokenizer

    def encode(texts: list[str]) -> list[Tensor]:
        return [torch.tensor(tok(t, add_special_tokens=False)["input_ids"][: s.lm_max_len]) for t in texts]

    tok = train_tokenizer(chat_texts(data / "train.json"), vocab_size=s.lm_vocab)
    train = encode(chat_texts(data / "train.json", tok))
    test = encode(chat_texts(data / "test.json", tok))
    sizes = dict(hidden_size=s.lm_hidden, num_layers=s.lm_layers, num_heads=s.lm_heads)
    sizes |= dict(num_kv_heads=s.lm_kv_heads, intermediate_size=s.lm_intermediate)
    task = LMPretrainTask(
        build_tiny_causal_lm(tok, seed=seed, **sizes), tok, train, batch_size=s.lm_batch, seed=seed
    )
    before = held_out_loss(task.model, test, tok.pad_token_id)
    task.model.train()
    summary = train_into(
        task, out, steps=s.lm_steps, lr=s.lm_lr, weight_decay=0.01, seed=seed, name="LM pretraining"
    )
    after = held_out_loss(task.model.cpu(), test, tok.pad_token_id)
    stats = {
        "vocab_size": len(tok),
        "held_out_loss_before": before,
        "held_out_loss": after,
        "final_train_loss": summary["loss"],
        "train_tokens": sum(len(t) for t in train),
        "params": sum(p.numel() for p in task.model.parameters()),
    }
    (out / "pretrain.json").write_text(json.dumps(stats, indent=1) + "\n")
    print(f"  LM: held-out loss {before:.2f} -> {after:.2f} ({len(tok)} tokens vocabulary)")
    return stats
