"""The model card (``README.md``) of every directory cmpt hands out, ready for ``hf upload``
(docs/method.md §2.1 outputs, §3 "Backbones", §5 scorers).

Written by ``VisionLanguageModel`` / ``NativeViT`` / ``Embedder.save_pretrained`` — so a run's
``final/`` and ``cmpt export`` carry one — and built from the directory itself plus, when known,
the training run that produced the weights:

* YAML front matter: ``library_name: cmpt``, ``tags``, ``pipeline_tag`` per kind (VLM:
  ``image-text-to-text``, NativeViT: ``image-feature-extraction``, Embedder:
  ``feature-extraction``), ``base_model`` (the hub ids the model started from: names of a hub id's
  form that are no relative path from here nor from the directories of its run, of its save or of
  the model it was re-saved from);
* what it was trained from (``model.init``, or ``model.vision`` + ``model.llm``), recipe and stage,
  steps, data sources (a mixture's members listed), read from the run's ``config.yaml``;
* a results table from the run's evaluation JSONs (``cmpt eval ... --out RUN/eval/...``, or
  ``*_results.json`` in the run directory): the headline number of each;
* how to load it (transformers' Auto classes after ``import cmpt``, or cmpt's own loaders).

The run is found by :func:`find_run`: explicitly (``cmpt export`` passes the checkpoint's run and
step), from the atomic-output markers (:mod:`cmpt.io_atomic`) of the directory or its parents
(a run's ``final/`` is written by ``cmpt.train.Trainer``; an export records its run), or from the
directory a re-saved model was loaded from.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from cmpt.hub import hub_cli, is_hub_id
from cmpt.io_atomic import COMPLETE_MARKER, WRITING_MARKER, read_marker

__all__ = ["CARD_NAME", "RunFacts", "find_run", "model_kind", "render_card", "write_model_card"]

CARD_NAME = "README.md"
TRAINER = "cmpt.train.Trainer"  # the writer of a run's final/ (cmpt.train.loop)
EXPORT = "cmpt export"  # the writer of an exported checkpoint (cmpt.export)

_KINDS = {  # kind -> (pipeline_tag, tags, one-line description)
    "vlm": ("image-text-to-text", ["vision-language-model", "comp", "c-rope"], "a vision-language model"),
    "vit": (
        "image-feature-extraction",
        ["vision-encoder", "native-resolution", "comp", "c-rope"],
        "a native-resolution vision encoder (NativeViT)",
    ),
    "embedder": (
        "feature-extraction",
        ["multimodal-embeddings", "moca", "bidirectional"],
        "a bidirectional multimodal embedding model",
    ),
}
_LOADERS = {"vlm": "VisionLanguageModel", "vit": "NativeViT", "embedder": "Embedder"}
_HEADLINES = (  # (key of a `cmpt eval` result JSON, label); docs/method.md §3 "Evaluation", §5
    ("mmeb_mean_precision_at_1", "MMEB mean P@1"),
    ("pages_mean_ndcg_at_5", "page retrieval nDCG@5"),
    ("score", "VQA {metric}"),
    ("top1", "linear probe top-1"),
    ("miou", "segmentation mIoU"),
    ("mean_recall", "image-text retrieval mean recall"),
)


@dataclass
class RunFacts:
    """The training run behind a directory: ``run_dir`` (holds ``config.yaml``), the ``step`` of the
    weights (None: the run's ``train.steps``, as for ``final/``) and the checkpoint they came from."""

    run_dir: Path
    step: int | None = None
    checkpoint: str | None = None


def _run_from_marker(p: Path) -> RunFacts | None:
    for name in (WRITING_MARKER, COMPLETE_MARKER):
        m = read_marker(p, name)
        if m is None:
            continue
        if m.get("writer") == TRAINER:  # p is run.dir/final (or its temporary sibling)
            step = m.get("step")
            return RunFacts(p.parent, int(step) if step is not None else None)
        if m.get("writer") == EXPORT and m.get("run_dir"):
            step = m.get("step")
            return RunFacts(Path(m["run_dir"]), int(step) if step is not None else None, m.get("checkpoint"))
    return None


def find_run(path: str | os.PathLike | None) -> RunFacts | None:
    """The run that wrote ``path``, from the markers of ``path`` and its two parents (``final/vit``
    is inside ``final/``), or None."""
    if path is None:
        return None
    p = Path(path).absolute()
    for q in (p, p.parent, p.parent.parent):
        run = _run_from_marker(q)
        if run is not None:
            return run
    return None


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def model_kind(directory: str | os.PathLike) -> str:
    """``"embedder"``, ``"vlm"`` or ``"vit"``: what a cmpt directory holds."""
    d = Path(directory)
    if (d / "embedder_config.json").is_file():
        return "embedder"
    if (d / "vlm_config.json").is_file():
        return "vlm"
    if _read_json(d / "config.json").get("cmpt_model") == "NativeViT":
        return "vit"
    raise ValueError(f"{d} is not a cmpt model directory (VLM, NativeViT or Embedder): no model card for it")


def _model_sources(d: Path, kind: str) -> list[str]:
    """Where the weights came from, as the directory records it."""
    vlm = _read_json(d / "vlm_config.json")
    if vlm:
        return [s for s in (vlm.get("vision"), vlm.get("llm")) if s]
    if kind == "vit":
        return [s for s in [_read_json(d / "config.json").get("source")] if s]
    return [s for s in [_read_json(d / "config.json").get("_name_or_path")] if s]  # HF backbone


def _run_config(run: RunFacts | None) -> dict[str, Any]:
    if run is None or not (run.run_dir / "config.yaml").is_file():
        return {}
    try:
        cfg = yaml.safe_load((run.run_dir / "config.yaml").read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return {}
    return cfg if isinstance(cfg, dict) else {}


def _data_sources(data: dict[str, Any]) -> list[str]:
    path = str(data.get("path") or "")
    if not path:
        return []
    out = [path + (f" (split {data['split']})" if data.get("split") else "")]
    if path.endswith((".yaml", ".yml")) and Path(path).is_file():
        try:
            mix = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
        except (OSError, yaml.YAMLError):
            mix = {}
        members = mix.get("datasets") if isinstance(mix, dict) else None
        for m in members or []:
            if isinstance(m, dict) and m.get("path"):
                extra = ", ".join(f"{k} {m[k]}" for k in ("sampling", "weight") if k in m)
                out.append(f"  - {m['path']}" + (f" ({extra})" if extra else ""))
    return out


def _results(run: RunFacts | None) -> list[tuple[str, str, float, str]]:
    """(file, label, value, model evaluated) for each headline number of the run's eval JSONs."""
    if run is None:
        return []
    files = sorted({*run.run_dir.glob("eval/**/*.json"), *run.run_dir.glob("*_results.json")})
    rows = []
    for f in files:
        res = _read_json(f)
        model = str(res.get("model", ""))
        for key, label in _HEADLINES:
            value = res.get(key)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                rows.append((str(f.relative_to(run.run_dir)), label.format(**res), float(value), model))
        for point in res.get("points") or []:  # `cmpt eval resolution`: one score per max_pixels
            if isinstance(point, dict) and isinstance(point.get("score"), (int, float)):
                label = f"VQA {point.get('metric', '')} at max_pixels {point.get('max_pixels')}"
                rows.append((str(f.relative_to(run.run_dir)), label, float(point["score"]), model))
    return rows


def _cell(x: Any) -> str:
    return str(x).replace("|", "\\|").replace("\n", " ")


def _training_rows(cfg: dict[str, Any], run: RunFacts | None) -> list[str]:
    if not cfg or run is None:
        return ["| training run | not known (saved outside a cmpt training run) |"]
    model_cfg, stage = cfg.get("model") or {}, cfg.get("stage") or {}
    if model_cfg.get("init"):
        start = f"`{_cell(model_cfg['init'])}`"
    else:
        start = ", ".join(f"{k} `{_cell(model_cfg[k])}`" for k in ("vision", "llm") if model_cfg.get(k))
    steps = (cfg.get("train") or {}).get("steps")
    step = f"{run.step if run.step is not None else steps} of {steps}"
    if run.checkpoint:
        step += f" (checkpoint `{_cell(Path(run.checkpoint).name)}`)"
    data = _data_sources(cfg.get("data") or {})
    return [
        f"| recipe | `{cfg.get('recipe', '?')}`, stage `{stage.get('name', '?')}` |",
        f"| trained from | {start or 'not recorded'} |",
        f"| steps | {step} |",
        f"| trainable parts | {', '.join(map(str, stage.get('trainable') or [])) or 'not recorded'} |",
        f"| data | {'<br>'.join(_cell(x) for x in data) or 'not recorded'} |",
        f"| run | `{_cell(run.run_dir.name)}` |",
    ]


def _was_local(name: str, anchors: Iterable[str | os.PathLike | None]) -> bool:
    """Whether ``name`` is a relative path that exists from one of ``anchors`` (directories) or their
    parents: a model records its sources as given, relative to where it was built (a run's
    directory, the directory it was saved to or loaded from, or one above), not to the current one."""
    if Path(name).is_absolute():
        return False
    roots = {q for a in anchors if a is not None for q in (Path(a).absolute(), *Path(a).absolute().parents)}
    return any((root / name).exists() for root in roots)


def _base_models(names: Iterable[Any], anchors: Iterable[str | os.PathLike | None] = ()) -> list[str]:
    """The ``names`` that are hub ids (``base_model``): of a hub id's form and no local path from here
    (:func:`cmpt.hub.is_hub_id`) nor from the ``anchors`` (:func:`_was_local`); in order, once each."""
    anchors = list(anchors)
    hub = (n for n in names if isinstance(n, str) and is_hub_id(n) and not _was_local(n, anchors))
    return list(dict.fromkeys(hub))


def render_card(
    directory: str | os.PathLike,
    run: RunFacts | None = None,
    *,
    sources: Iterable[str | os.PathLike | None] = (),
) -> str:
    """The card text of ``directory`` (see the module docstring); ``sources``: the directories a
    re-saved model was loaded from (relative names it records may be relative to them)."""
    d = Path(directory)
    kind = model_kind(d)
    pipeline_tag, tags, what = _KINDS[kind]
    cfg = _run_config(run)
    model_cfg = cfg.get("model") or {}
    sources_recorded = _model_sources(d, kind)
    starts = [model_cfg.get(k) for k in ("init", "vision", "llm")] + sources_recorded
    base = _base_models(starts, [d, *sources, run.run_dir if run is not None else None])
    meta: dict[str, Any] = {"library_name": "cmpt", "pipeline_tag": pipeline_tag}
    meta["tags"] = list(dict.fromkeys(["cmpt", *tags, *([cfg["recipe"]] if cfg.get("recipe") else [])]))
    if base:
        meta["base_model"] = base
    name = _public_name(d)
    title = f"{run.run_dir.name}: {name}" if run is not None else name
    lines = ["---", yaml.safe_dump(meta, sort_keys=False).rstrip(), "---", "", f"# {title}", ""]
    lines += [f"{what[0].upper()}{what[1:]}, saved by cmpt (continual multimodal pre-training).", ""]
    lines += ["## Training", "", "| | |", "|---|---|", *_training_rows(cfg, run)]
    if sources_recorded:
        started = ", ".join(f"`{_cell(s)}`" for s in sources_recorded)
        lines.append(f"| weights started from | {started} |")
    lines.append("")
    rows = _results(run)
    if rows:
        lines += ["## Results", "", "| evaluation | metric | score | model evaluated |", "|---|---|---:|---|"]
        for f, label, v, m in rows:
            lines.append(f"| `{_cell(f)}` | {_cell(label)} | {v:.4f} | {_cell(m) or '-'} |")
        lines.append("")
    lines += _usage(kind, d)
    return "\n".join(lines) + "\n"


def _public_name(d: Path) -> str:
    """The directory's name, without the suffix of an atomic write in progress (:mod:`cmpt.io_atomic`)."""
    return d.name.partition(".tmp-")[0]


def _usage(kind: str, d: Path) -> list[str]:
    hf_backbone = kind == "embedder" and not (d / "vlm_config.json").is_file()
    auto = (
        "transformers' own Qwen2-VL classes load the backbone (`AutoModel.from_pretrained(REPO)`)"
        if hf_backbone
        else "`AutoModel.from_pretrained(REPO)` (after `import cmpt`) gives the same outputs"
    )
    return [
        "## Usage",
        "",
        "```python",
        "import cmpt",
        "",
        f'model = cmpt.{_LOADERS[kind]}.from_pretrained("REPO")  # a hub id or a local directory',
        "```",
        "",
        f"{auto}. Upload: `{hub_cli()} upload REPO {_public_name(d)}`.",
    ]


def write_model_card(
    directory: str | os.PathLike,
    run: RunFacts | None = None,
    *,
    sources: Iterable[str | os.PathLike | None] = (),
) -> Path:
    """Write ``directory/README.md``; ``run`` explicitly, else :func:`find_run` of the directory and
    then of ``sources`` (the directories a re-saved model was loaded from)."""
    d, sources = Path(directory), list(sources)
    if run is None:
        run = next((r for r in map(find_run, [d, *sources]) if r is not None), None)
    path = d / CARD_NAME
    path.write_text(render_card(d, run, sources=sources), encoding="utf-8")
    return path
