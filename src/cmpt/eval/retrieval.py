"""Zero-shot image↔text retrieval in the alignment-loss spaces of a VLM (method.md §5, §2 ``L_align``).

* **Image feature**: the mean of the record's merged vision tokens (PatchMerger output, the LLM
  input space): ``F_v`` of the alignment loss.
* **Caption feature**: ``model.text_features`` of the caption alone (LLM body, last hidden
  state mean-pooled): ``F_t`` of the alignment loss. Both are L2-normalized; similarity = cosine.
* **Caption** of a record = its first gpt answer (the dense caption of the synthetic data).
* Recall@1/5/10 in both directions with :func:`~cmpt.eval.metrics.recall_at_k` (ties optimistic).
  Records with identical captions are all positives of each other, so duplicates do not count
  as misses.

A bare NativeViT has no text side: :func:`retrieval_eval` raises a ``TypeError`` saying so.
"""

from __future__ import annotations

import os
from contextlib import closing
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from cmpt.data.sources import check_image_root
from cmpt.eval.features import load_records, processor_with
from cmpt.eval.metrics import recall_at_k
from cmpt.eval.runtime import pick_device, results_file, write_result
from cmpt.eval.vqa import resolve_data
from cmpt.prefetch import ordered_map
from cmpt.vision.processor import load_image
from cmpt.vision.vit import NativeViT

__all__ = ["KS", "retrieval_eval", "retrieval_main", "retrieval_scores"]

KS = (1, 5, 10)


def _caption(rec: dict) -> str | None:
    for turn in rec.get("conversations") or []:
        if turn.get("from", turn.get("role")) in ("gpt", "assistant"):
            text = str(turn.get("value", turn.get("content", ""))).strip()
            return text or None
    return None


def retrieval_scores(sim: torch.Tensor, captions: list[str]) -> dict[str, Any]:
    """Recall@k both ways of an (images × captions) similarity; equal captions are joint positives."""
    same = torch.tensor([[a == b for b in captions] for a in captions])
    i2t = {f"R@{k}": recall_at_k(sim, same, k) for k in KS}
    t2i = {f"R@{k}": recall_at_k(sim.T, same.T, k) for k in KS}
    mean = sum([*i2t.values(), *t2i.values()]) / (2 * len(KS))
    return {"i2t": i2t, "t2i": t2i, "mean_recall": mean}


@torch.no_grad()
def _vision_features(model: Any, records: list[dict], proc, batch_size: int) -> torch.Tensor:
    """Each record's pooled image tokens; the images are loaded and patchified by threads ahead of
    the model (:func:`cmpt.prefetch.ordered_map`, docs/method.md §7)."""
    m2 = proc.merge_size**2
    feats = []

    def load(record: dict) -> Any:
        return proc([load_image(p) for p in record["images"]])

    with closing(ordered_map(load, records)) as prepared:
        for start in range(0, len(records), batch_size):
            chunk = [next(prepared) for _ in records[start : start + batch_size]]
            patches = torch.cat([c.patches for c in chunk])
            grid_hw = torch.cat([c.grid_hw for c in chunk])
            tokens = model.encode_images(patches, grid_hw).float()
            per_record = [int((c.grid_hw[:, 0] * c.grid_hw[:, 1]).sum()) // m2 for c in chunk]
            feats.extend(t.mean(0) for t in tokens.split(per_record))
    return torch.stack(feats).cpu()


@torch.no_grad()
def _text_features(model: Any, captions: list[str], batch_size: int, max_len: int = 256) -> torch.Tensor:
    tok = model.tokenizer
    feats = []
    for start in range(0, len(captions), batch_size):
        ids = [
            tok(c, add_special_tokens=False)["input_ids"][:max_len]
            for c in captions[start : start + batch_size]
        ]
        cu = torch.tensor([0, *(len(x) for x in ids)]).cumsum(0)
        flat = torch.tensor([t for x in ids for t in x], dtype=torch.long)
        feats.append(model.text_features(flat, cu).float().cpu())
    return torch.cat(feats)


def retrieval_eval(
    model: Any,
    data: str | os.PathLike,
    *,
    limit: int | None = None,
    max_pixels: int | None = None,
    batch_size: int = 16,
    image_root: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Image↔text Recall@1/5/10 from pooled features (docs/method.md §5; see the module docstring).

    ``model``: a :class:`~cmpt.vlm.model.VisionLanguageModel` (anything with ``encode_images``,
    ``text_features``, ``tokenizer`` and ``processor``). ``data``: LLaVA JSON(L) or a directory
    (``test.json``, else ``val.json``); records without an image or a caption are skipped.
    ``image_root``: where image paths resolve (default: the data file's directory).

    Returns ``{"i2t": {"R@1", "R@5", "R@10"}, "t2i": {...}, "mean_recall", "n", "skipped"}``.
    """
    if isinstance(model, NativeViT) or not hasattr(model, "text_features"):
        raise TypeError(
            f"retrieval needs a text side: {type(model).__name__} has no text_features. Pass a "
            "VisionLanguageModel (its merged vision tokens and caption features are compared); a bare "
            "NativeViT can only be evaluated with the linear / segmentation probes"
        )
    path = resolve_data(data)
    records, captions, skipped = [], [], 0
    for rec in load_records(path, limit, image_root):
        cap = _caption(rec)
        if rec.get("images") and cap:
            records.append(rec)
            captions.append(cap)
        else:
            skipped += 1
    if len(records) < 2:
        raise ValueError(f"{path}: retrieval needs at least 2 records with an image and a caption")
    proc = getattr(model, "processor", None)
    if proc is None:
        from cmpt.eval.features import default_processor

        proc = default_processor(model.vit)
    proc = processor_with(proc, max_pixels)
    was_training = getattr(model, "training", False)
    if hasattr(model, "eval"):
        model.eval()
    try:
        v = F.normalize(_vision_features(model, records, proc, batch_size), dim=-1)
        t = F.normalize(_text_features(model, captions, batch_size), dim=-1)
    finally:
        if hasattr(model, "train"):
            model.train(was_training)
    if v.shape[1] != t.shape[1]:
        raise ValueError(f"vision features have dim {v.shape[1]} but caption features {t.shape[1]}")
    return {**retrieval_scores(v @ t.T, captions), "n": len(records), "skipped": skipped}


def retrieval_main(
    model: Any,
    data: str | os.PathLike,
    *,
    limit: int | None = None,
    max_pixels: int | None = None,
    device: str | None = None,
    out: str | os.PathLike | None = None,
    image_root: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """``cmpt eval retrieval`` (docs/method.md §5): ``model`` is a VLM directory (or a loaded model); a
    NativeViT directory is refused with a clear error. Writes JSON to ``out`` when given (a directory, or
    a path ending in ``/``: ``retrieval_results.json`` inside it)."""
    out_file = results_file(out, "retrieval")
    if isinstance(model, (str, os.PathLike)):
        d = Path(model)
        if not d.exists():
            raise FileNotFoundError(f"--model {str(d)!r} does not exist: pass a cmpt VLM directory")
        if not (d / "vlm_config.json").is_file():
            raise ValueError(
                f"--model {str(d)!r} is not a VLM directory (no vlm_config.json): retrieval needs a cmpt VLM "
                "(its text side); evaluate a bare vision model with `cmpt eval probe` / `cmpt eval seg`"
            )
    data = resolve_data(data)  # the data are checked before the model loads
    check_image_root(image_root, "--image-root")
    if isinstance(model, (str, os.PathLike)):
        from cmpt.vlm.model import VisionLanguageModel

        model = VisionLanguageModel.from_pretrained(model, device=pick_device(device))
    result = retrieval_eval(model, data, limit=limit, max_pixels=max_pixels, image_root=image_root)
    result["data"] = str(data)
    if out_file is not None:
        write_result(result, out_file, "retrieval")
    return result
