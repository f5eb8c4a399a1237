"""The demo's fixed-resolution ViT, pretrained by supervised multi-task classification of shape scenes.

CoMP starts from a vision model pretrained at one fixed resolution (docs/method.md §2.1); the
offline demo makes it here as a recipe of the generic trainer (:func:`cmpt.demo.pretrain_run.train_into`):
a Hugging Face ``Dinov2Model`` trained from scratch at a fixed square resolution to tell the largest
shape, its colour and the number of shapes − 2, one linear head per task on [CLS, mean of the patch
tokens].
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn

from ..train import LossTerms
from ..vision.convert import IMAGENET_MEAN, IMAGENET_STD
from .pretrain_run import ShuffledBatches, train_into

if TYPE_CHECKING:
    from .tiny_models import TinySizes

__all__ = [
    "HEADS",
    "SceneClassifier",
    "VitPretrainTask",
    "accuracy",
    "normalize",
    "pretrain_vit",
    "scene_arrays",
]

HEADS = (("shape", 3), ("colour", 8), ("count", 4))  # the ViT's classification tasks and classes


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
