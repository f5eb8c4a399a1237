"""lmms-eval model classes for cmpt VLMs: ``lmms-eval --model cmpt|cmpt_chat`` (docs/method.md §5).

Registration (checked against lmms-eval 0.7.3). The command is ``lmms-eval`` (console script) or
``python -m lmms_eval``; ``--model NAME`` is resolved through lmms-eval's model registry
(``lmms_eval.models.MODEL_REGISTRY_V2``), which at import loads every entry point of the group
``lmms_eval.models``. cmpt's ``pyproject.toml`` declares::

    [project.entry-points."lmms_eval.models"]
    cmpt = "cmpt.eval.lmms_eval_plugin:lmms_eval_manifest"

and :func:`lmms_eval_manifest` returns two ``ModelManifest`` s: ``cmpt`` (the "simple" model
:class:`CmptLMMS`, for every task, multiple-choice included) and ``cmpt_chat`` (the "chat" model
:class:`CmptChatLMMS`, for lmms-eval's chat-message tasks, generation only). A model object can
also be passed directly: ``lmms_eval.evaluator.simple_evaluate(model=CmptLMMS(pretrained=d), ...)``.
Local tasks: ``--include_path DIR`` (``TaskManager(include_path=DIR)``).

Import failures. lmms-eval turns an entry point that fails to import into one warning line and a
later "model not found". This module therefore imports, at module level, only the standard
library, torch and lmms-eval's base class; the cmpt modules the classes use are imported when a
model is built or first used, so a failure there reaches the user as its own traceback. (Python
runs ``cmpt/__init__.py`` before this module: what fails there is still reported by lmms-eval as
one warning line and "model not found".) lmms-eval is optional:
when it is not installed, the base class falls back to ``object`` and nothing is registered (the
classes can be unit-tested offline); when it is installed but broken, its own error is raised here.

Behaviour. Images come from ``doc_to_visual(self.task_dict[task][split][doc_id])`` (simple) or the
image parts of the chat messages (chat); ``<image>`` placeholders are removed from a simple
model's context (the images go first, the LLaVA layout the model is trained with). The prompt is
one user turn rendered with the chat template (:func:`~cmpt.vlm.chat.render_prompt`), after the
system turn ``system_prompt`` (a chat request's own system message wins).

* ``generate_until``: greedy decoding in batches of ``batch_size`` consecutive requests with the
  same ``until`` / ``max_new_tokens`` (and system turn); the text is cut at the first ``until``
  string. Sampling settings (``temperature > 0``, ``do_sample``, ``num_beams > 1``) are ignored
  with a warning.
* ``loglikelihood`` (requests ``(context, continuation, doc_to_visual, doc_id, task, split)``, the
  continuation a string or ``doc_to_target``; or ``(context, continuation)``):
  :func:`~cmpt.eval.likelihood.continuation_logprobs` in batches of ``batch_size``, answering
  ``(-sum of the continuation's token log-probs, is_greedy)``: the *negative* log-likelihood,
  because lmms-eval's multiple-choice scoring picks the choice with the lowest value (``argmin``:
  its own models answer losses), although its base class documents a log-probability. The
  continuation starts the assistant's answer, so its leading whitespace (lmms-eval's
  ``target_delimiter``, there for plain-text prompts) is dropped. Each answer is a tuple that
  lmms-eval 0.7.x's evaluator does not turn into text (see ``_Answer``).
* ``cmpt_chat`` answers a system turn plus one user turn (consecutive user messages are joined);
  assistant turns in a request (multi-turn histories), videos and audio raise
  ``NotImplementedError`` naming the document. Multi-round generation is not implemented.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from collections.abc import Sequence
from typing import Any

import torch

if importlib.util.find_spec("lmms_eval") is None:  # not installed: a plain class, registered nowhere
    _LmmsBase: type = object
    HAS_LMMS_EVAL = False
else:  # installed: a broken installation raises its own error here, not a silent fallback
    from lmms_eval.api import instance as _instance
    from lmms_eval.api.model import lmms as _LmmsBase

    HAS_LMMS_EVAL = True
_GenerationResult: Any = getattr(_instance, "GenerationResult", None) if HAS_LMMS_EVAL else None

__all__ = [
    "CHAT_MODEL_NAME",
    "HAS_LMMS_EVAL",
    "MODEL_NAME",
    "CmptChatLMMS",
    "CmptLMMS",
    "chat_request",
    "cut_at_stop",
    "lmms_eval_manifest",
]

log = logging.getLogger("cmpt.eval")

MODEL_NAME = "cmpt"
CHAT_MODEL_NAME = "cmpt_chat"
CLASS_PATH = "cmpt.eval.lmms_eval_plugin.CmptLMMS"
CHAT_CLASS_PATH = "cmpt.eval.lmms_eval_plugin.CmptChatLMMS"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_VIDEO_EXTS = (".mp4", ".avi", ".mov", ".mkv", ".webm")


def lmms_eval_manifest() -> tuple[Any, ...]:
    """Entry point of the group ``lmms_eval.models``: the manifests of ``cmpt`` and ``cmpt_chat``."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return (
        ModelManifest(model_id=MODEL_NAME, simple_class_path=CLASS_PATH),
        ModelManifest(model_id=CHAT_MODEL_NAME, chat_class_path=CHAT_CLASS_PATH),
    )


def _as_int(value: Any, default: Any) -> Any:
    try:
        return int(value)
    except (TypeError, ValueError):
        return default


def _check_image(v: Any) -> Any:
    """``v`` if it is an image (PIL, path or bytes); videos and audio are refused."""
    if isinstance(v, (str, os.PathLike)) and str(v).lower().endswith(_VIDEO_EXTS):
        raise NotImplementedError(f"cmpt models read images only, got a video: {v}")
    if isinstance(v, dict):
        raise NotImplementedError(f"cmpt models read images only, got {sorted(v)} (audio?)")
    return v


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
            out.append(_check_image(v))
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


def _clean_context(context: str) -> str:
    return context.replace("<image>", "").strip() if "<image>" in context else context


def chat_request(messages: Sequence[dict], where: str = "?") -> tuple[list[Any], str, str | None]:
    """lmms-eval chat messages (``[{"role", "content": str | [{"type": "text"|"image", ...}]}]``)
    → ``(images, prompt, system)``: each image part becomes an ``<image>`` line at its place in the
    user text. ``where`` names the document in errors (see the module docstring for what is refused)."""
    images: list[Any] = []
    user: list[str] = []
    system: list[str] = []
    for m in messages:
        role, content = m.get("role"), m.get("content")
        parts = [{"type": "text", "text": content}] if isinstance(content, str) else list(content or [])
        if role not in ("system", "user"):
            raise NotImplementedError(
                f"{where}: cmpt_chat answers a system turn and one user turn; got a {role!r} message "
                "(multi-turn histories are not supported)"
            )
        for part in parts:
            kind = part.get("type")
            if kind == "text":
                (system if role == "system" else user).append(part.get("text") or "")
            elif kind == "image" and role == "user":
                images.append(_check_image(part.get("url", part.get("image"))))
                user.append("<image>")
            else:
                raise NotImplementedError(f"{where}: cmpt models read text and images, got a {kind!r} part")
    return images, "\n".join(user), ("\n".join(system) if system else None)


if _GenerationResult is not None:

    class _Answer(tuple, _GenerationResult):
        """A ``(nll, is_greedy)`` pair that is also a ``GenerationResult`` whose ``text`` is the pair.

        lmms-eval 0.7.x passes every answer through ``unwrap_generation_output``, which turns
        anything but a string or a ``GenerationResult`` into its ``str()``: a plain pair reaches the
        multiple-choice scorer as text and the task fails ("too many values to unpack"), whatever the
        model. This pair is a tuple for every caller and comes out of the unwrapping unchanged.
        """

        def __init__(self, pair: tuple[float, bool]) -> None:
            _GenerationResult.__init__(self, text=tuple(pair))


def _answer(nll: float, greedy: bool) -> tuple[float, bool]:
    return (nll, greedy) if _GenerationResult is None else _Answer((nll, greedy))


class _NoCache:
    """The cache hook of a model built without lmms-eval (records nothing)."""

    def add_partial(self, attr: str, req: Any, res: Any) -> None:
        return None


class CmptLMMS(_LmmsBase):
    """lmms-eval "simple" model wrapping a :class:`~cmpt.vlm.model.VisionLanguageModel`.

    Model args (``--model_args k=v,...``): ``pretrained`` (VLM directory, or a loaded model when
    built in Python), ``device`` (default: ``cuda:$LOCAL_RANK`` when CUDA is available, else CPU),
    ``batch_size`` (requests per forward), ``max_pixels`` / ``min_pixels`` (override the saved
    processor), ``dtype`` of the LLM (``float32`` | ``bfloat16`` | ``float16``),
    ``max_new_tokens`` (default when a task sets none), ``system_prompt``.
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
        from cmpt.eval.features import default_processor, processor_with
        from cmpt.vlm.model import VisionLanguageModel

        for name, default in (
            ("_rank", 0),
            ("_world_size", 1),
            ("task_dict", {}),
            ("cache_hook", _NoCache()),
        ):
            if not hasattr(self, name):
                setattr(self, name, default)
        unused = {k: v for k, v in kwargs.items() if k not in ("max_batch_size",) and v is not None}
        if unused:
            log.warning("cmpt lmms-eval model: ignoring unknown model args %s", sorted(unused))
        if device in (None, "", "auto", "cuda") and torch.cuda.is_available():
            device = f"cuda:{_as_int(os.environ.get('LOCAL_RANK'), 0)}"
        self._device = torch.device(device or "cpu")
        if isinstance(pretrained, (str, os.PathLike)):
            torch_dtype = _DTYPES.get(str(dtype)) if dtype else None
            if dtype and torch_dtype is None:
                raise ValueError(f"dtype={dtype!r}: choose one of {sorted(_DTYPES)}")
            self._model = VisionLanguageModel.from_pretrained(
                pretrained, device=self._device, dtype=torch_dtype
            )
        else:
            self._model = pretrained
        self._model.eval()
        proc = getattr(self._model, "processor", None) or default_processor(self._model.vit)
        self.processor = processor_with(proc, _as_int(max_pixels, None), _as_int(min_pixels, None))
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

    def _doc(self, task: str, split: str, doc_id: Any) -> Any:
        return self.task_dict[task][split][doc_id]

    def _job(self, args: tuple) -> tuple[list[Any] | None, str, str | None, dict | None]:
        """``(images, prompt, system, gen_kwargs)`` of a simple ``generate_until`` request."""
        context, gen_kwargs, doc_to_visual, doc_id, task, split = args[:6]
        visuals = []
        if doc_to_visual is not None:
            visuals = _flatten_visuals(doc_to_visual(self._doc(task, split, doc_id)))
        return visuals or None, _clean_context(context), self.system_prompt, gen_kwargs

    def generate_until(self, requests: Sequence[Any]) -> list[str]:
        """Greedy answers, one string per request, in request order (see the module docstring)."""
        from tqdm import tqdm

        jobs = [self._job(req.args) for req in requests]
        keys = [(*self._settings(gen), system) for _, _, system, gen in jobs]
        results: list[str] = []
        bar = tqdm(total=len(requests), disable=self.rank != 0, desc="cmpt responding")
        start = 0
        while start < len(requests):
            end = start + 1
            while end < len(requests) and end - start < self.batch_size and keys[end] == keys[start]:
                end += 1
            until, max_new, system = keys[start]
            texts = self._model.generate_batch(
                [(images, prompt) for images, prompt, _, _ in jobs[start:end]],
                processor=self.processor,
                max_new_tokens=max_new,
                system=system,
            )
            for req, text in zip(requests[start:end], texts):
                text = cut_at_stop(text, until)
                results.append(text)
                self.cache_hook.add_partial("generate_until", (req.args[0], req.args[1]), text)
            bar.update(end - start)
            start = end
        bar.close()
        return results

    def loglikelihood(self, requests: Sequence[Any]) -> list[tuple[float, bool]]:
        """``(-log p(continuation | images, context), is_greedy)`` per request (module docstring)."""
        from cmpt.eval.likelihood import continuation_logprobs

        visuals: dict[tuple, list[Any] | None] = {}  # per document: its choices share the images
        items = []
        for req in requests:
            context, target = req.args[0], req.args[1]
            images = None
            if len(req.args) >= 6:
                doc_to_visual, doc_id, task, split = req.args[2:6]
                doc = self._doc(task, split, doc_id)
                key = (task, split, doc_id)
                if key not in visuals:
                    visuals[key] = _flatten_visuals(doc_to_visual(doc)) if doc_to_visual else None
                images = visuals[key] or None
                target = target if isinstance(target, str) else target(doc)
            items.append((images, _clean_context(context), str(target).lstrip()))
        scores = continuation_logprobs(
            self._model, items, self.processor, system=self.system_prompt, batch_size=self.batch_size
        )
        answers = [_answer(-logprob, greedy) for logprob, greedy in scores]
        for req, res in zip(requests, answers):
            self.cache_hook.add_partial("loglikelihood", (req.args[0], req.args[1]), res)
        return answers

    def generate_until_multi_round(self, requests: Sequence[Any]) -> list[str]:
        raise NotImplementedError("the cmpt lmms-eval model does not implement multi-round generation")


class CmptChatLMMS(CmptLMMS):
    """lmms-eval "chat" model (``--model cmpt_chat``): requests carry ``doc_to_messages``.

    Same model args as :class:`CmptLMMS`. ``generate_until`` takes lmms-eval's chat requests
    ``(context, doc_to_messages, gen_kwargs, doc_id, task, split)`` and renders the messages with
    :func:`chat_request`; ``loglikelihood`` takes the simple requests (lmms-eval's chat tasks are
    generation only, multiple-choice tasks run with ``--model cmpt``).
    """

    is_simple = False

    def _job(self, args: tuple) -> tuple[list[Any] | None, str, str | None, dict | None]:
        _context, doc_to_messages, gen_kwargs, doc_id, task, split = args[:6]
        messages = doc_to_messages(self._doc(task, split, doc_id))
        images, prompt, system = chat_request(messages, f"task {task!r} split {split!r} doc {doc_id!r}")
        return images or None, prompt, system or self.system_prompt, gen_kwargs
