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
  (:func:`cmpt.demo.tiny_lm.train_tokenizer`) and a small Qwen2 causal LM pretrained on the
  training conversations (rendered as text chats), so it already "speaks" the domain.
  ``lm/pretrain.json`` records its losses.

Both models are trained by :mod:`cmpt.demo.vit_pretrain` / :mod:`cmpt.demo.lm_pretrain` with the
project's :class:`~cmpt.train.Trainer`; the run's ``config.yaml`` and ``metrics.jsonl`` stay in
``vit-hf/pretrain/`` and ``lm/pretrain/``.

Each part is written to a temporary directory and renamed into place with a completion marker
(``.cmpt-complete.json``) holding the settings it was built with; a later call with the same
settings skips it.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from multiprocessing import get_context
from pathlib import Path

from ..paths import cache_root
from .lm_pretrain import pretrain_lm
from .vit_pretrain import pretrain_vit

__all__ = ["FULL", "MARKER", "QUICK", "TinySizes", "prepare_tiny", "tiny_root"]

MARKER = ".cmpt-complete.json"
DATA_FORMAT = 2  # bump when the layout or content of data/ changes: cached data is rebuilt
PRETRAIN_FORMAT = 2  # bump when the pretraining of vit-hf/ or lm/ changes (2: through cmpt.train.Trainer)


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
    vit_key = (
        {k: v for k, v in key.items() if k.startswith("vit_")} | data_key | {"pretrain": PRETRAIN_FORMAT}
    )
    lm_key = {k: v for k, v in key.items() if k.startswith("lm_")} | data_key | {"pretrain": PRETRAIN_FORMAT}
    data = root / "data"
    _build_cached(data, data_key, lambda d: _build_data(d, s, seed, workers=1 if quick else 2), "data")
    _build_cached(
        root / "vit-hf", vit_key, lambda d: pretrain_vit(d, data, s, seed), "ViT (fixed resolution)"
    )
    _build_cached(root / "lm", lm_key, lambda d: pretrain_lm(d, data, s, seed), "language model")
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
