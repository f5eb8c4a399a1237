"""VQA evaluation of a VisionLanguageModel on LLaVA-format records, and held-out caption loss (method.md §5).

Decisions:

* **Questions.** Every QA pair of every record is one question: ``meta["qa"]`` (``{"q", "a",
  "type"}``, ``"answers"`` when several gold answers exist) when present, as written by
  :mod:`cmpt.demo.synthetic`. Otherwise the (human, gpt) turn pairs of the conversation; when a
  record has more than one pair the first is its dense-caption turn and is skipped, a single pair
  is a plain VQA question. ``<image>`` placeholders are removed from the question text; the
  record's images are given to the model (``render_prompt`` puts them first, the LLaVA layout).
* **Prompt.** ``question + suffix``. The default suffix is the benchmark's, as in lmms-eval:
  ChartQA ``"\\nAnswer the question with a single word."``, DocVQA and others
  ``"\\nAnswer the question using a single word or phrase."``; ``prompt_suffix=""`` disables it.
* **Decoding.** Greedy, batched (``model.generate_batch``), ``max_new_tokens``; the prediction is
  the decoded text with surrounding whitespace stripped, nothing else.
* **Metric** ``"auto"``, per record: ``relaxed_accuracy`` (ChartQA; max over gold answers) when
  ``meta.kind == "charts"`` or the dataset path contains ``chartqa``; ``anls`` (DocVQA, canonical)
  for ``meta.kind == "docs"`` or ``docvqa``; ``vqa_accuracy`` otherwise. ``"anls_lmms_eval"``
  selects lmms-eval's ANLS variant. A mixed dataset reports ``"metric": "mixed"`` and
  ``per_metric`` scores; ``score`` is then the mean over all questions.
* ``limit`` counts records (each contributes all its questions); ``data`` is a JSON / JSONL file,
  or a directory holding ``test.json``, else ``val.json``.
"""

from __future__ import annotations

import json
import logging
import os
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from cmpt.data.sources import check_image_root
from cmpt.eval.features import load_records
from cmpt.eval.metrics import anls, relaxed_accuracy, vqa_accuracy
from cmpt.eval.pixels import (
    _mean_vision_tokens,
    _model_processor,
    effective_resolution,
    fixed_resolution_note,
)
from cmpt.eval.runtime import check_out_dir, pick_device, write_result
from cmpt.vision.processor import load_image

__all__ = [
    "METRICS",
    "Question",
    "caption_loss",
    "evaluate_vqa",
    "resolve_data",
    "route_metric",
    "score_answer",
    "vqa_main",
    "vqa_questions",
]

log = logging.getLogger("cmpt.eval")

METRICS = ("relaxed_accuracy", "anls", "anls_lmms_eval", "vqa_accuracy")
CHARTQA_SUFFIX = "\nAnswer the question with a single word."
SHORT_ANSWER_SUFFIX = "\nAnswer the question using a single word or phrase."


@dataclass
class Question:
    """One VQA question of a record."""

    id: str
    question: str
    answers: list[str]
    images: list[str]
    type: str = "qa"
    metric: str = "vqa_accuracy"
    meta: dict[str, Any] = field(default_factory=dict)


def resolve_data(data: str | os.PathLike) -> Path:
    """A JSON / JSONL file as given; a directory → its ``test.json``, else ``val.json``; a missing
    one is a ``FileNotFoundError`` naming ``--data`` and what it takes."""
    p = Path(data)
    if p.is_dir():
        for name in ("test.json", "val.json"):
            if (p / name).is_file():
                return p / name
        raise FileNotFoundError(f"--data {p} has neither test.json nor val.json; pass the JSON file itself")
    if not p.is_file():
        raise FileNotFoundError(
            f"--data {p} does not exist: pass a LLaVA JSON / JSONL file, or a directory holding test.json "
            "or val.json"
        )
    return p


def route_metric(kind: str | None, dataset_name: str, metric: str = "auto") -> str:
    """The scorer of a record: ``metric`` unless ``"auto"`` (see the module docstring)."""
    if metric != "auto":
        if metric not in METRICS:
            raise ValueError(f"metric={metric!r}: choose 'auto' or one of {METRICS}")
        return metric
    name = dataset_name.lower()
    if kind == "charts" or "chartqa" in name:
        return "relaxed_accuracy"
    if kind == "docs" or "docvqa" in name:
        return "anls"
    return "vqa_accuracy"


def score_answer(prediction: str, answers: Sequence[str], metric: str) -> float:
    """Score of one prediction against its gold answers with the named docs/method.md §5 scorer."""
    if metric == "relaxed_accuracy":
        return max((float(relaxed_accuracy(prediction, a)) for a in answers), default=0.0)
    if metric == "anls":
        return anls(prediction, list(answers))
    if metric == "anls_lmms_eval":
        return anls(prediction, list(answers), variant="lmms-eval")
    if metric == "vqa_accuracy":
        return vqa_accuracy(prediction, list(answers))
    raise ValueError(f"unknown metric {metric!r}; choose one of {METRICS}")


def _turn_text(turn: dict) -> str:
    return str(turn.get("value", turn.get("content", "")))


def _pairs(conversations: Any) -> list[tuple[str, str]]:
    """(human, gpt) pairs of a conversation, consecutive turns of one role joined."""
    pairs, question = [], None
    for turn in conversations or []:
        role = turn.get("from", turn.get("role"))
        if role in ("human", "user"):
            question = _turn_text(turn) if question is None else question + "\n" + _turn_text(turn)
        elif role in ("gpt", "assistant") and question is not None:
            pairs.append((question, _turn_text(turn)))
            question = None
    return pairs


def vqa_questions(records: Sequence[dict], dataset_name: str = "", metric: str = "auto") -> list[Question]:
    """Every QA pair of every record as a :class:`Question` (see the module docstring)."""
    out = []
    for rec in records:
        meta = rec.get("meta") or {}
        chosen = route_metric(meta.get("kind"), dataset_name, metric)
        if meta.get("qa"):
            items = [
                (qa["q"], qa.get("answers") or [qa["a"]], str(qa.get("type", "qa"))) for qa in meta["qa"]
            ]
        else:
            pairs = _pairs(rec.get("conversations"))
            pairs = pairs[1:] if len(pairs) > 1 else pairs
            items = [(q, [a], "qa") for q, a in pairs]
        for k, (q, answers, qtype) in enumerate(items):
            text = " ".join(q.replace("<image>", " ").split()) if "<image>" in q else q.strip()
            out.append(
                Question(
                    f"{rec.get('id')}#{k}",
                    text,
                    [str(a) for a in answers],
                    list(rec.get("images", [])),
                    qtype,
                    chosen,
                    {"kind": meta.get("kind")},
                )
            )
    return out


def _default_suffix(metric: str) -> str:
    return CHARTQA_SUFFIX if metric == "relaxed_accuracy" else SHORT_ANSWER_SUFFIX


def evaluate_vqa(
    model: Any,
    data: str | Path,
    *,
    max_pixels: int | None = None,
    min_pixels: int | None = None,
    limit: int | None = None,
    batch_size: int = 8,
    max_new_tokens: int = 16,
    metric: str = "auto",
    prompt_suffix: str | None = None,
    out_jsonl: str | Path | None = None,
    image_root: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Batched greedy VQA evaluation (docs/method.md §5; decisions in the module docstring).

    ``model`` is a :class:`~cmpt.vlm.model.VisionLanguageModel` (anything with ``generate_batch``
    and ``processor``). The image processor is the model's with ``min_pixels`` / ``max_pixels``
    overridden when given. Predictions go to ``out_jsonl`` (``{"id", "question", "prediction",
    "answers", "score", "type", "metric"}`` per line). ``image_root``: where image paths resolve
    (default: the data file's directory).

    Returns ``{"score", "metric", "n", "per_type", "per_metric", "mean_vision_tokens",
    "max_pixels", "min_pixels", "n_records", "predictions"}``; ``max_pixels`` is the effective one,
    with ``fixed_resolution`` / ``requested_max_pixels`` for a fixed-resolution processor
    (:func:`~cmpt.eval.pixels.effective_resolution`).
    """
    path = resolve_data(data)
    records = load_records(path, limit, image_root)
    dataset_name = f"{path.parent.name}/{path.name}"
    questions = vqa_questions(records, dataset_name, metric)
    if not questions:
        raise ValueError(f"{path}: no questions found (neither meta.qa nor question/answer turns)")
    proc = _model_processor(model, max_pixels, min_pixels)
    predictions: list[str] = []
    for start in range(0, len(questions), batch_size):
        chunk = questions[start : start + batch_size]
        cache = {p: load_image(p) for p in dict.fromkeys(p for q in chunk for p in q.images)}
        items = []
        for q in chunk:
            suffix = _default_suffix(q.metric) if prompt_suffix is None else prompt_suffix
            items.append(([cache[p] for p in q.images] or None, q.question + suffix))
        answers = model.generate_batch(items, processor=proc, max_new_tokens=max_new_tokens)
        if len(answers) != len(items):
            raise RuntimeError(f"generate_batch returned {len(answers)} answers for {len(items)} prompts")
        predictions.extend(a.strip() for a in answers)

    scores = [score_answer(p, q.answers, q.metric) for p, q in zip(predictions, questions)]
    by_type, by_metric = defaultdict(list), defaultdict(list)
    for q, s in zip(questions, scores):
        by_type[q.type].append(s)
        by_metric[q.metric].append(s)
    metrics_used = sorted(by_metric)
    if out_jsonl is not None:
        out = Path(out_jsonl)
        out.parent.mkdir(parents=True, exist_ok=True)
        with open(out, "w", encoding="utf-8") as fh:
            for q, p, s in zip(questions, predictions, scores):
                row = {"id": q.id, "question": q.question, "prediction": p, "answers": q.answers}
                row.update(score=s, type=q.type, metric=q.metric)
                fh.write(json.dumps(row, ensure_ascii=False) + "\n")
    return {
        "score": sum(scores) / len(scores),
        "metric": metrics_used[0] if len(metrics_used) == 1 else "mixed",
        "n": len(questions),
        "per_type": {t: sum(v) / len(v) for t, v in sorted(by_type.items())},
        "per_metric": {m: sum(v) / len(v) for m, v in sorted(by_metric.items())},
        "mean_vision_tokens": _mean_vision_tokens([p for q in questions for p in q.images], proc),
        **effective_resolution(proc),
        "min_pixels": proc.min_pixels,
        "n_records": len(records),
        "predictions": str(out_jsonl) if out_jsonl is not None else None,
    }


@torch.no_grad()
def caption_loss(
    model: Any,
    data: str | Path,
    *,
    limit: int | None = None,
    max_pixels: int | None = None,
    batch_size: int = 8,
    image_root: str | os.PathLike | None = None,
) -> float:
    """Mean next-token loss per supervised token over held-out records (docs/method.md §5, §2 ``L_dec``).

    Records are built exactly as in training (:class:`~cmpt.data.pipeline.SampleBuilder`), collated
    and scored by CoMP's objective without the alignment term, in eval mode;
    ``Σ lm_sum / Σ lm_count`` over all batches. Bad samples are skipped with a warning.
    """
    from cmpt.data.llava_source import LlavaSource
    from cmpt.data.pipeline import SampleBuilder, collate
    from cmpt.data.sources import BadSample
    from cmpt.recipes.comp import LossConfig
    from cmpt.recipes.comp_objective import CompObjective

    src = LlavaSource(resolve_data(data), image_root or None)
    n = len(src) if limit is None else min(len(src), int(limit))
    proc = _model_processor(model, max_pixels, None)
    builder = SampleBuilder(
        proc,
        model.tokenizer,
        caption_max_tokens=0,
        merge_size=model.config.merge_size,
        shuffle_caption=False,
    )
    objective = CompObjective(model, LossConfig(align=False))
    was_training = model.training
    model.eval()
    total, count, bad = 0.0, 0, 0
    try:
        for start in range(0, n, batch_size):
            samples = []
            for i in range(start, min(n, start + batch_size)):
                try:
                    samples.append(builder.build(src[i]))
                except BadSample as e:
                    bad += 1
                    log.warning("caption_loss: skipping %s", e)
            if not samples:
                continue
            out = objective(collate(samples))
            total += float(out["lm_sum"])
            count += int(out["lm_count"])
    finally:
        model.train(was_training)
    if count == 0:
        raise ValueError(f"{data}: no supervised token in {n} records ({bad} bad)")
    return total / count


def vqa_main(
    model: Any,
    data: str | os.PathLike,
    *,
    max_pixels: int | None = None,
    min_pixels: int | None = None,
    limit: int | None = None,
    batch_size: int = 8,
    max_new_tokens: int = 16,
    metric: str = "auto",
    prompt_suffix: str | None = None,
    with_caption_loss: bool = False,
    device: str | None = None,
    out_dir: str | os.PathLike | None = None,
    image_root: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """``cmpt eval vqa`` (docs/method.md §5): ``model`` is a VLM directory (or a loaded model). With
    ``out_dir``, writes ``predictions.jsonl`` and ``vqa_results.json`` there; returns the result.
    The output directory and the data are checked before the model loads; a fixed resolution that
    overrides ``max_pixels`` is a warning (:func:`~cmpt.eval.pixels.fixed_resolution_note`)."""
    check_out_dir(out_dir, "vqa", ("predictions.jsonl", "vqa_results.json"))
    data = resolve_data(data)
    check_image_root(image_root, "--image-root")
    if batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {batch_size}")
    if isinstance(model, (str, os.PathLike)):
        from cmpt.vlm.model import VisionLanguageModel

        model = VisionLanguageModel.from_pretrained(model, device=pick_device(device))
    out = Path(out_dir) if out_dir is not None else None
    result = evaluate_vqa(
        model,
        data,
        max_pixels=max_pixels,
        min_pixels=min_pixels,
        limit=limit,
        batch_size=batch_size,
        max_new_tokens=max_new_tokens,
        metric=metric,
        prompt_suffix=prompt_suffix,
        out_jsonl=out / "predictions.jsonl" if out is not None else None,
        image_root=image_root,
    )
    if with_caption_loss:
        result["caption_loss"] = caption_loss(
            model, data, limit=limit, max_pixels=max_pixels, image_root=image_root
        )
    result["data"] = str(data)
    if max_pixels is not None and (note := fixed_resolution_note([result])):
        log.warning("cmpt eval vqa: %s", note)
    if out is not None:
        write_result(result, out / "vqa_results.json", "vqa")
    return result
