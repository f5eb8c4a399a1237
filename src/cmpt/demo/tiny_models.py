"""Tiny "pretrained" starting points for the offline CoMP demo, made by cmpt's own code and cached.

CoMP continues a vision foundation model that was pretrained at *one fixed resolution* with a
learned position table, next to a pretrained LLM. :func:`prepare_tiny` builds the same situation
in a few CPU minutes, under ``{cache}/tiny`` (``{cache}/tiny-quick`` for ``quick=True``), exactly
where ``configs/tiny/comp_stage*.yaml`` look:

* ``data/``: synthetic charts, documents and shape scenes (:mod:`cmpt.demo.synthetic`), each with
  its own seed stream per split; ``data/train.json`` is the VLM mixture (charts + docs + scene
  captions/QA), ``data/test.json`` the held-out charts + docs questions.
* ``vit-hf/``: a Hugging Face ``Dinov2Model`` trained from scratch by supervised multi-task
  classification of scenes (largest shape = the probe label, its colour, the number of shapes) at
  a fixed square resolution, saved with ``preprocessor_config.json``; ``NativeViT.from_hf`` loads
  it. ``vit-hf/pretrain.json`` records its validation accuracies.
* ``lm/``: a byte-level BPE tokenizer trained on the synthetic text
  (:func:`cmpt.demo.tiny_lm.train_tokenizer`)
  and a small Qwen2 causal LM pretrained on the training conversations (rendered as text chats), so
  it already "speaks" the domain. ``lm/pretrain.json`` records its losses.

Each part is written to a temporary directory and renamed into place with a completion marker
(``.cmpt-complete.json``) holding the settings it was built with; a later call with the same
settings skips it.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..recipes.paths import cache_root

__all__ = ["FULL", "MARKER", "QUICK", "TinySizes", "prepare_tiny", "tiny_root"]

MARKER = ".cmpt-complete.json"
DATA_FORMAT = 2  # bump when the layout or content of data/ changes: cached data is rebuilt
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class TinySizes:
    """Dataset sizes, model sizes and training lengths of the tiny starting points."""

    charts: tuple[int, int] = (300, 48)  # train, test
    docs: tuple[int, int] = (300, 48)
    scenes: tuple[int, int, int] = (1200, 240, 48)  # train, val, test
    scenes_in_mix: int = 300  # scene samples in the VLM training mixture
    seg_train: int = 300  # scene train samples of the segmentation probe (it trains on full label maps)
    vit_size: int = 112  # the fixed pretraining resolution (square, pixels)
    vit_hidden: int = 96
    vit_layers: int = 4
    vit_heads: int = 4
    vit_steps: int = 400
    vit_batch: int = 64
    vit_lr: float = 2e-3
    lm_vocab: int = 1024
    lm_hidden: int = 128
    lm_layers: int = 4
    lm_heads: int = 4
    lm_kv_heads: int = 2
    lm_intermediate: int = 384
    lm_steps: int = 250
    lm_batch: int = 16
    lm_lr: float = 2e-3
    lm_max_len: int = 320


FULL = TinySizes()
QUICK = TinySizes(  # --quick / tests: seconds, not minutes
    charts=(16, 8), docs=(16, 8), scenes=(96, 48, 8), scenes_in_mix=16, seg_train=32,
    vit_size=56, vit_hidden=48, vit_layers=2, vit_steps=150, vit_batch=32, vit_lr=3e-3,
    lm_vocab=384, lm_hidden=32, lm_layers=2, lm_intermediate=64, lm_steps=30, lm_batch=8, lm_max_len=256,
)  # fmt: skip


def tiny_root(cache: str | os.PathLike | None = None, quick: bool = False) -> Path:
    """``{cache}/tiny`` or ``{cache}/tiny-quick``."""
    return cache_root(cache) / ("tiny-quick" if quick else "tiny")


def _read_marker(path: Path, key: dict) -> dict | None:
    marker = path / MARKER
    if not marker.is_file():
        return None
    try:
        info = json.loads(marker.read_text())
    except json.JSONDecodeError:
        return None
    return info if info.get("key") == key else None


def _build_cached(path: Path, key: dict, build: Callable[[Path], dict], label: str) -> dict:
    """Run ``build(tmp_dir) -> info`` unless ``path`` holds a complete build with the same ``key``."""
    info = _read_marker(path, key)
    if info is not None:
        print(f"  {label}: cached at {path}")
        return info
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    t0 = time.perf_counter()
    info = {"key": key, **build(tmp), "seconds": 0.0}
    info["seconds"] = round(time.perf_counter() - t0, 1)
    (tmp / MARKER).write_text(json.dumps(info, indent=1) + "\n")
    shutil.rmtree(path, ignore_errors=True)
    os.replace(tmp, path)
    print(f"  {label}: built in {info['seconds']} s -> {path}")
    return info


# ----------------------------------------------------------------------------- data
def _generate_job(kind: str, n: int, out: str, seed: int, split: str) -> str:
    from .synthetic import generate, split_seed

    return str(generate(kind, n, out, seed=split_seed(seed, split), split=split))


def _vqa_style(rec: dict) -> dict:
    """The same sample as a VQA-style conversation (LLaVA-1.5 mix style): the image with the first
    question, every question with the benchmark's answer-format suffix (as evaluated by
    :func:`cmpt.eval.vqa.evaluate_vqa`), the caption request last. The answers are unchanged."""
    from ..eval.vqa import CHARTQA_SUFFIX, SHORT_ANSWER_SUFFIX

    conv = rec["conversations"]
    if len(conv) < 4:
        return rec
    suffix = CHARTQA_SUFFIX if rec["meta"]["kind"] == "charts" else SHORT_ANSWER_SUFFIX
    turns = []
    for i in range(2, len(conv) - 1, 2):
        turns += [
            {"from": "human", "value": ("<image>\n" if i == 2 else "") + conv[i]["value"] + suffix},
            conv[i + 1],
        ]
    turns += [{"from": "human", "value": conv[0]["value"].replace("<image>\n", "")}, conv[1]]
    return dict(rec, conversations=turns)


def _mixture(
    data: Path, parts: list[tuple[str, str, int | None]], out_name: str, vqa_style: bool = False
) -> Path:
    """Interleave ``(kind, split, limit)`` JSON lists into ``data/<out_name>`` (image paths re-rooted),
    round-robin, so that the first ``k`` records (an evaluation ``limit``) mix all kinds. With
    ``vqa_style`` every other record of a kind becomes a VQA-style conversation (:func:`_vqa_style`)."""
    lists = []
    for kind, split, limit in parts:
        recs = []
        for i, rec in enumerate(json.loads((data / kind / f"{split}.json").read_text())[:limit]):
            rec = dict(rec, image=f"{kind}/{rec['image']}", meta=dict(rec["meta"]))
            if "mask" in rec["meta"]:
                rec["meta"]["mask"] = f"{kind}/{rec['meta']['mask']}"
            recs.append(_vqa_style(rec) if vqa_style and i % 2 == 0 else rec)
        lists.append(recs)
    records = [lst[i] for i in range(max(map(len, lists))) for lst in lists if i < len(lst)]
    path = data / out_name
    path.write_text(json.dumps(records, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    return path


def _build_data(out: Path, s: TinySizes, seed: int, workers: int = 1) -> dict:
    jobs = [("charts", n, "train" if i == 0 else "test") for i, n in enumerate(s.charts)]
    jobs += [("docs", n, "train" if i == 0 else "test") for i, n in enumerate(s.docs)]
    jobs += [("scenes", n, split) for n, split in zip(s.scenes, ("train", "val", "test"))]
    args = [(k, n, str(out / k), seed, sp) for k, n, sp in jobs]
    if workers > 1:  # charts (matplotlib) dominate: run the jobs two at a time
        with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn")) as pool:
            for f in [pool.submit(_generate_job, *a) for a in args]:
                f.result()
    else:
        for a in args:
            _generate_job(*a)
    for split in ("train", "val", "test"):  # a second probe label: the number of shapes
        path = out / "scenes" / f"{split}.json"
        scenes = json.loads(path.read_text())
        for rec in scenes:
            rec["meta"]["num_shapes"] = len(rec["meta"]["shapes"])
        path.write_text(json.dumps(scenes, indent=1, ensure_ascii=False) + "\n")
        if split == "train":
            (out / "scenes" / "seg_train.json").write_text(json.dumps(scenes[: s.seg_train], indent=1) + "\n")
    mix = [("charts", "train", None), ("docs", "train", None), ("scenes", "train", s.scenes_in_mix)]
    _mixture(out, mix, "train.json", vqa_style=True)
    _mixture(out, [("charts", "test", None), ("docs", "test", None)], "test.json")
    return {"counts": {f"{k}/{sp}": n for k, n, sp in jobs}}


# ----------------------------------------------------------------------------- vision
def _scene_arrays(json_path: Path, size: int) -> tuple[torch.Tensor, torch.Tensor]:
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


HEADS = (("shape", 3), ("colour", 8), ("count", 4))


class _Classifier(torch.nn.Module):
    """HF Dinov2Model + one linear head per task on [CLS, mean of patch tokens]."""

    def __init__(self, vit: torch.nn.Module, dim: int) -> None:
        super().__init__()
        self.vit = vit
        self.heads = torch.nn.ModuleList(torch.nn.Linear(2 * dim, n) for _, n in HEADS)

    def forward(self, pixels: torch.Tensor) -> list[torch.Tensor]:
        h = self.vit(pixel_values=pixels).last_hidden_state
        feats = torch.cat([h[:, 0], h[:, 1:].mean(1)], dim=-1)
        return [head(feats) for head in self.heads]


def _normalize(x: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (x.float() / 255.0 - mean) / std


def _fit(
    model: torch.nn.Module,
    batch_loss: Callable[[int, torch.Generator], torch.Tensor],
    *,
    steps: int,
    lr: float,
    weight_decay: float,
    desc: str,
    seed: int,
) -> float:
    """AdamW, linear warmup (10 %) then cosine, gradient clipping at 1, a progress bar; returns the
    last loss. ``batch_loss(step, generator)`` draws a batch and returns its loss."""
    from tqdm.auto import tqdm

    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    gen, warmup = torch.Generator().manual_seed(seed), max(1, steps // 10)
    model.train()
    bar = tqdm(range(steps), desc=desc, unit="step", leave=False)
    for step in bar:
        scale = (
            (step + 1) / warmup
            if step < warmup
            else 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))
        )
        for g in opt.param_groups:
            g["lr"] = lr * scale
        loss = batch_loss(step, gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
    model.eval()
    return loss.item()


@torch.no_grad()
def _accuracy(model: _Classifier, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    """Top-1 of every head."""
    model.eval()
    outs = [model(_normalize(b)) for b in x.split(128)]
    return {
        name: float((torch.cat([o[i] for o in outs]).argmax(1) == y[:, i]).float().mean())
        for i, (name, _) in enumerate(HEADS)
    }


def _build_vit(out: Path, data: Path, s: TinySizes, seed: int) -> dict:
    """Train a Dinov2Model at ``s.vit_size²`` on scenes; save it in HF format + preprocessor config."""
    import transformers as tf

    x_tr, y_tr = _scene_arrays(data / "scenes" / "train.json", s.vit_size)
    x_va, y_va = _scene_arrays(data / "scenes" / "val.json", s.vit_size)
    torch.manual_seed(seed)
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
    model = _Classifier(tf.Dinov2Model(cfg), s.vit_hidden)

    def batch_loss(step: int, gen: torch.Generator) -> torch.Tensor:
        idx = torch.randint(len(x_tr), (s.vit_batch,), generator=gen)
        xb = x_tr[idx].flip(-1) if step % 2 else x_tr[idx]  # flips change no target
        logits = model(_normalize(xb))
        return sum(torch.nn.functional.cross_entropy(lg, y_tr[idx, i]) for i, lg in enumerate(logits))

    last = _fit(
        model,
        batch_loss,
        steps=s.vit_steps,
        lr=s.vit_lr,
        weight_decay=0.05,
        desc="ViT pretraining",
        seed=seed,
    )
    chance = {name: 1.0 / n for name, n in HEADS}
    val, train = _accuracy(model, x_va, y_va), _accuracy(model, x_tr[:512], y_tr[:512])
    model.vit.save_pretrained(str(out))
    side = {"height": s.vit_size, "width": s.vit_size}  # a fixed-resolution checkpoint (DINOv2-style)
    pre = dict(image_processor_type="BitImageProcessor", size=side, crop_size=side, do_center_crop=False)
    pre |= dict(resample=3, image_mean=list(IMAGENET_MEAN), image_std=list(IMAGENET_STD))
    (out / "preprocessor_config.json").write_text(json.dumps(pre, indent=1) + "\n")
    stats = {
        "resolution": s.vit_size,
        "val_accuracy": sum(val.values()) / len(val),  # mean over the tasks
        "chance_accuracy": sum(chance.values()) / len(chance),
        "val": val,
        "train": train,
        "chance": chance,
        "n_train": len(x_tr),
        "n_val": len(x_va),
        "final_loss": last,
    }
    (out / "pretrain.json").write_text(json.dumps(stats, indent=1) + "\n")
    print(
        f"  ViT @ {s.vit_size}px, val accuracy: shape {val['shape']:.3f} (chance 0.333), "
        f"colour {val['colour']:.3f} (0.125), count {val['count']:.3f} (0.25)"
    )
    return stats


# ----------------------------------------------------------------------------- language model
def _chat_texts(json_path: Path, tokenizer: Any = None) -> list[str]:
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


def _lm_batches(tok: Any, texts: list[str], max_len: int) -> list[torch.Tensor]:
    return [torch.tensor(tok(t, add_special_tokens=False)["input_ids"][:max_len]) for t in texts]


def _lm_loss(model: Any, seqs: list[torch.Tensor], pad_id: int) -> torch.Tensor:
    ids = torch.nn.utils.rnn.pad_sequence(seqs, batch_first=True, padding_value=pad_id)
    mask = torch.nn.utils.rnn.pad_sequence([torch.ones_like(s) for s in seqs], batch_first=True)
    labels = ids.masked_fill(mask == 0, -100)
    return model(input_ids=ids, attention_mask=mask, labels=labels).loss


def _build_lm(out: Path, data: Path, s: TinySizes, seed: int) -> dict:
    """BPE tokenizer + Qwen2 causal LM pretrained on the training conversations (text only)."""
    from .tiny_lm import build_tiny_causal_lm, save_tiny_lm, train_tokenizer

    tok = train_tokenizer(_chat_texts(data / "train.json"), vocab_size=s.lm_vocab)
    train = _lm_batches(tok, _chat_texts(data / "train.json", tok), s.lm_max_len)
    test = _lm_batches(tok, _chat_texts(data / "test.json", tok), s.lm_max_len)
    sizes = dict(hidden_size=s.lm_hidden, num_layers=s.lm_layers, num_heads=s.lm_heads)
    sizes |= dict(num_kv_heads=s.lm_kv_heads, intermediate_size=s.lm_intermediate)
    model = build_tiny_causal_lm(tok, seed=seed, **sizes)
    pad = tok.pad_token_id

    @torch.no_grad()
    def held_out() -> float:
        model.eval()
        losses = [float(_lm_loss(model, test[i : i + 16], pad)) for i in range(0, len(test), 16)]
        return sum(losses) / len(losses)

    def batch_loss(step: int, gen: torch.Generator) -> torch.Tensor:
        idx = torch.randint(len(train), (s.lm_batch,), generator=gen).tolist()
        return _lm_loss(model, [train[i] for i in idx], pad)

    before = held_out()
    last = _fit(
        model, batch_loss, steps=s.lm_steps, lr=s.lm_lr, weight_decay=0.01, desc="LM pretraining", seed=seed
    )
    after = held_out()
    save_tiny_lm(model, tok, out)
    stats = {
        "vocab_size": len(tok),
        "held_out_loss_before": before,
        "held_out_loss": after,
        "final_train_loss": last,
        "train_tokens": sum(len(t) for t in train),
        "params": sum(p.numel() for p in model.parameters()),
    }
    (out / "pretrain.json").write_text(json.dumps(stats, indent=1) + "\n")
    print(f"  LM: held-out loss {before:.2f} -> {after:.2f} ({len(tok)} tokens vocabulary)")
    return stats


# ----------------------------------------------------------------------------- entry point
def prepare_tiny(cache: Path | str | None = None, *, quick: bool = False, seed: int = 0) -> dict[str, Path]:
    """Build (or reuse) the tiny data, "pretrained" ViT and LM under ``{cache}/tiny[-quick]``.

    Returns paths: ``root``, ``vision`` (HF Dinov2 dir), ``llm`` (HF causal-LM dir), ``data``
    (``data/train.json``, the VLM mixture), ``data_test`` (``data/test.json``, held-out charts +
    docs), ``scenes_train`` / ``scenes_val`` / ``scenes_test`` (probe and scene-QA splits),
    ``scenes_seg_train`` (the first scenes of ``scenes_train``, for the segmentation probe),
    ``vision_stats`` / ``lm_stats`` (the ``pretrain.json`` records, e.g. the ViT's val accuracy).
    """
    s = QUICK if quick else FULL
    root = tiny_root(cache, quick)
    root.mkdir(parents=True, exist_ok=True)
    key = {"seed": seed, **{k: list(v) if isinstance(v, tuple) else v for k, v in asdict(s).items()}}
    data_key = {k: key[k] for k in ("seed", "charts", "docs", "scenes", "scenes_in_mix", "seg_train")}
    data_key["format"] = DATA_FORMAT
    vit_key = {k: v for k, v in key.items() if k.startswith("vit_")} | data_key
    lm_key = {k: v for k, v in key.items() if k.startswith("lm_")} | data_key
    data = root / "data"
    _build_cached(data, data_key, lambda d: _build_data(d, s, seed, workers=1 if quick else 2), "data")
    _build_cached(root / "vit-hf", vit_key, lambda d: _build_vit(d, data, s, seed), "ViT (fixed resolution)")
    _build_cached(root / "lm", lm_key, lambda d: _build_lm(d, data, s, seed), "language model")
    return {
        "root": root,
        "vision": root / "vit-hf",
        "llm": root / "lm",
        "data": data / "train.json",
        "data_test": data / "test.json",
        "scenes_train": data / "scenes" / "train.json",
        "scenes_val": data / "scenes" / "val.json",
        "scenes_test": data / "scenes" / "test.json",
        "scenes_seg_train": data / "scenes" / "seg_train.json",
        "vision_stats": root / "vit-hf" / "pretrain.json",
        "lm_stats": root / "lm" / "pretrain.json",
    }
