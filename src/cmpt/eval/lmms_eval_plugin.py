"""lmms-eval model class for cmpt VLMs: ``lmms_eval --model cmpt --model_args pretrained=DIR`` (method.md §5).

Registration. Current lmms-eval (checked against 0.7.3) resolves ``--model NAME`` through its model
registry (``lmms_eval.models.MODEL_REGISTRY_V2``), which at import loads every entry point of the
group ``lmms_eval.models``. Each entry point must load to a ``ModelManifest``, an iterable of them,
or a *callable returning* one (so it must not point at the class itself, which is callable too).
cmpt's ``pyproject.toml`` therefore declares::

    [project.entry-points."lmms_eval.models"]
    cmpt = "cmpt.eval.lmms_eval_plugin:lmms_eval_manifest"

and :func:`lmms_eval_manifest` returns ``ModelManifest(model_id="cmpt",
simple_class_path="cmpt.eval.lmms_eval_plugin.CmptLMMS")``. The class is also decorated with
lmms-eval's legacy ``@register_model("cmpt")`` when lmms-eval is importable. A model object can
also be passed directly: ``lmms_eval.evaluator.simple_evaluate(model=CmptLMMS(pretrained=d), ...)``.

lmms-eval is an optional dependency: without it this module still imports (the base class falls
back to ``object`` and nothing is registered), so the class can be unit-tested offline.

Behaviour ("simple" model, ``is_simple = True``): ``generate_until`` takes each request's
``(context, gen_kwargs, doc_to_visual, doc_id, task, split)``, gets the images with
``doc_to_visual(self.task_dict[task][split][doc_id])``, removes ``<image>`` placeholders from the
context (the images go first, the LLaVA layout the model is trained with), and decodes greedily in
batches of ``batch_size`` consecutive requests with the same ``until`` / ``max_new_tokens``.
The text is cut at the first ``until`` string. Sampling settings (``temperature > 0``,
``do_sample``, ``num_beams > 1``) are ignored with a warning: decoding is always greedy.
``loglikelihood`` and multi-round generation are not implemented (``NotImplementedError``).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Any

import torch

try:  # optional dependency
    from lmms_eval.api.model import lmms as _LmmsBase
    from lmms_eval.api.registry import register_model as _register_model

    HAS_LMMS_EVAL = True
except ImportError:  # lmms-eval not installed: a plain class, not registered anywhere
    _LmmsBase = object  # type: ignore[assignment,misc]
    _register_model = None
    HAS_LMMS_EVAL = False

__all__ = ["HAS_LMMS_EVAL", "MODEL_NAME", "CmptLMMS", "lmms_eval_manifest"]

log = logging.getLogger("cmpt.eval")

MODEL_NAME = "cmpt"
CLASS_PATH = "cmpt.eval.lmms_eval_plugin.CmptLMMS"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _register(cls: type) -> type:
    if _register_model is not None:
        try:
            _register_model(MODEL_NAME)(cls)
        except Exception as e:  # an incompatible registry must not break the import
            log.debug("lmms-eval register_model(%r) failed: %s", MODEL_NAME, e)
    return cls


def lmms_eval_manifest() -> Any:
    """Entry point of the group ``lmms_eval.models``: the ``ModelManifest`` of ``--model cmpt``."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=MODEL_NAME, simple_class_path=CLASS_PATH)


def _as_int(value: Any, default: int) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return default


def _flatten_visuals(visuals: Any) -> list[Any]:
    """``doc_to_visual`` output (None, one image, lists, nested lists) → flat list of images/paths."""
    if visuals is None:
        return []
    if not isinstance(visuals, (list, tuple)):
        visuals = [visuals]
    out = []
    for v in visuals:
        if isinstance(v, (list, tuple)):
            out.extend(_flatten_visuals(v))
        elif v is not None:
            if isinstance(v, (str, os.PathLike)) and str(v).lower().endswith(
                (".mp4", ".avi", ".mov", ".mkv")
            ):
                raise NotImplementedError(f"cmpt models read images only, got a video: {v}")
            if isinstance(v, dict):
                raise NotImplementedError(f"cmpt models read images only, got {sorted(v)} (audio?)")
            out.append(v)
    return out


def cut_at_stop(text: str, until: Sequence[str]) -> str:
    """``text`` up to the first occurrence of any non-empty stop string."""
    cut = len(text)
    for s in until:
        if s:
            i = text.find(s)
            if i != -1:
                cut = min(cut, i)
    return text[:cut]


@_register
class CmptLMMS(_LmmsBase):
    """lmms-eval "simple" model wrapping a :class:`~cmpt.vlm.model.VisionLanguageModel`.

    Model args (``--model_args k=v,...``): ``pretrained`` (VLM directory, or a loaded model when
    built in Python), ``device`` (default: ``cuda:$LOCAL_RANK`` when CUDA is available, else CPU),
    ``batch_size``, ``max_pixels`` / ``min_pixels`` (override the saved processor), ``dtype`` of the
    LLM (``float32`` | ``bfloat16`` | ``float16``), ``max_new_tokens`` (default when a task sets
    none), ``system_prompt``.
    """

    is_simple = True

    def __init__(
        self,
        pretrained: Any,
        device: str | None = None,
        batch_size: int | str = 1,
        max_pixels: int | None = None,
        min_pixels: int | None = None,
        dtype: str | None = None,
        max_new_tokens: int = 128,
        system_prompt: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        for name, default in (("_rank", 0), ("_world_size", 1), ("task_dict", {})):
            if not hasattr(self, name):
                setattr(self, name, default)
        unused = {k: v for k, v in kwargs.items() if k not in ("max_batch_size",) and v is not None}
        if unused:
            log.warning("cmpt lmms-eval model: ignoring unknown model args %s", sorted(unused))
        if device in (None, "", "auto", "cuda") and torch.cuda.is_available():
            device = f"cuda:{_as_int(os.environ.get('LOCAL_RANK'), 0)}"
        self._device = torch.device(device or "cpu")
        if isinstance(pretrained, (str, os.PathLike)):
            from cmpt.vlm.model import VisionLanguageModel

            torch_dtype = _DTYPES.get(str(dtype)) if dtype else None
            if dtype and torch_dtype is None:
                raise ValueError(f"dtype={dtype!r}: choose one of {sorted(_DTYPES)}")
            self._model = VisionLanguageModel.from_pretrained(
                pretrained, device=self._device, dtype=torch_dtype
            )
        else:
            self._model = pretrained
        self._model.eval()
        from cmpt.eval.features import default_processor, processor_with

        proc = getattr(self._model, "processor", None) or default_processor(self._model.vit)
        self.processor = processor_with(proc, _as_int(max_pixels, None), _as_int(min_pixels, None))  # type: ignore[arg-type]
        self.batch_size_per_gpu = max(1, _as_int(batch_size, 1))
        self.max_new_tokens = _as_int(max_new_tokens, 128)
        self.system_prompt = system_prompt or None
        self._warned: set[str] = set()

    # ------------------------------------------------------------------ lmms-eval properties
    @property
    def model(self) -> Any:
        return self._model

    @property
    def tokenizer(self) -> Any:
        return self._model.tokenizer

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_gpu

    @property
    def rank(self) -> int:
        return self._rank

    @property
    def world_size(self) -> int:
        return self._world_size

    # ------------------------------------------------------------------ requests
    def _warn_once(self, key: str, msg: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            log.warning(msg)

    def _settings(self, gen_kwargs: dict | None) -> tuple[tuple[str, ...], int]:
        """``(until, max_new_tokens)`` of a request's generation kwargs (greedy only)."""
        kw = dict(gen_kwargs or {})
        until = kw.pop("until", None)
        until = [until] if isinstance(until, str) else list(until or [])
        if any(not isinstance(s, str) for s in until):
            raise ValueError(f"gen_kwargs['until'] must be a string or a list of strings, got {until!r}")
        if (
            float(kw.get("temperature") or 0) > 0
            or kw.get("do_sample")
            or _as_int(kw.get("num_beams"), 1) > 1
        ):
            self._warn_once(
                "sampling", "cmpt lmms-eval model decodes greedily; sampling/beam settings ignored"
            )
        return tuple(until), max(1, _as_int(kw.get("max_new_tokens"), self.max_new_tokens))

    def _item(self, args: tuple) -> tuple[list[Any] | None, str]:
        context, _gen, doc_to_visual, doc_id, task, split = args[:6]
        visuals = []
        if doc_to_visual is not None:
            visuals = _flatten_visuals(doc_to_visual(self.task_dict[task][split][doc_id]))
        prompt = context.replace("<image>", "").strip() if "<image>" in context else context
        return visuals or None, prompt

    def generate_until(self, requests: Sequence[Any]) -> list[str]:
        """Greedy answers, one string per request, in request order (see the module docstring)."""
        from tqdm import tqdm

        results: list[str] = []
        settings = [self._settings(req.args[1]) for req in requests]
        bar = tqdm(total=len(requests), disable=self.rank != 0, desc="cmpt responding")
        start = 0
        while start < len(requests):
            end = start + 1
            while end < len(requests) and end - start < self.batch_size and settings[end] == settings[start]:
                end += 1
            until, max_new = settings[start]
            items = [self._item(req.args) for req in requests[start:end]]
            texts = self._model.generate_batch(
                items, processor=self.processor, max_new_tokens=max_new, system=self.system_prompt
            )
            for req, text in zip(requests[start:end], texts):
                text = cut_at_stop(text, until)
                results.append(text)
                hook = getattr(self, "cache_hook", None)
                if hook is not None:
                    hook.add_partial("generate_until", (req.args[0], req.args[1]), text)
            bar.update(end - start)
            start = end
        bar.close()
        return results

    def loglikelihood(self, requests: Sequence[Any]) -> list[tuple[float, bool]]:
        raise NotImplementedError(
            "the cmpt lmms-eval model implements generate_until only (e.g. chartqa, docvqa_val); "
            "loglikelihood-based (multiple-choice by likelihood) tasks are not supported"
        )

    def generate_until_multi_round(self, requests: Sequence[Any]) -> list[str]:
        raise NotImplementedError("the cmpt lmms-eval model does not implement multi-round generation")
