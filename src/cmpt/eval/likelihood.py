"""Log-likelihood of a continuation under a cmpt VLM, for multiple-choice scoring (docs/method.md §5).

For each item ``(images, context, continuation)`` the context is rendered exactly as a generation
prompt (:func:`~cmpt.vlm.chat.render_prompt`: one user turn holding the images and the context, then
the assistant header), and the continuation's tokens follow it (tokenized alone, no special tokens,
no end-of-turn). The result is ``(sum of log p(token | everything before it), is_greedy)`` over the
continuation's tokens, where ``is_greedy`` says that every one of them is the arg-max of its
distribution (the continuation is what greedy decoding would produce).

Batches of ``batch_size`` items run through :meth:`VisionLanguageModel.forward` (causal attention,
the text packed or padded as the model is configured), longest first; the LM head is applied only
at the rows that predict a continuation token, and log-softmax is taken in float32. An item with an
empty continuation scores ``(0.0, True)`` without a forward. Identical ``images`` objects are
processed once per call (the choices of one multiple-choice question share their images).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from cmpt.vlm.chat import render_prompt

if TYPE_CHECKING:
    from cmpt.vlm.model import VisionLanguageModel

__all__ = ["continuation_logprobs"]


@dataclass
class _Encoded:
    prompt: torch.Tensor  # (p,) rendered context with expanded images
    target: torch.Tensor  # (k,) continuation tokens
    patches: torch.Tensor | None  # (P, 3·p·p) the item's images, packed
    grid_hw: torch.Tensor | None  # (n, 2)


def _encode(
    model: VisionLanguageModel,
    processor: Any,
    images: Sequence[Any] | None,
    context: str,
    continuation: str,
    system: str | None,
    processed: dict[int, Any],
) -> _Encoded:
    tok, m2 = model.tokenizer, model.config.merge_size**2
    patches = grid = None
    n_tokens: list[int] = []
    if images:
        if processor is None:
            raise ValueError("scoring with images needs an ImageProcessor (processor= or model.processor)")
        key = id(images)
        if key not in processed:  # keep ``images`` alive with its result so the id stays unique
            imgs = list(images) if isinstance(images, (list, tuple)) else [images]
            processed[key] = (images, processor(imgs))
        packed = processed[key][1]
        patches, grid = packed.patches, packed.grid_hw
        n_tokens = [int(h) * int(w) // m2 for h, w in grid.tolist()]
    prompt = render_prompt(context, tok, n_tokens, system=system)
    target = torch.tensor(tok(continuation, add_special_tokens=False)["input_ids"], dtype=torch.long)
    return _Encoded(prompt, target, patches, grid)


def _score_batch(model: VisionLanguageModel, batch: list[_Encoded]) -> list[tuple[float, bool]]:
    """One packed forward over ``batch``; log-probs at the rows that predict continuation tokens."""
    seqs = [torch.cat([e.prompt, e.target]) for e in batch]
    lengths = [len(s) for s in seqs]
    cu = [0]
    for n in lengths:
        cu.append(cu[-1] + n)
    with_images = [e for e in batch if e.patches is not None]
    out = model(
        torch.cat(seqs),
        cu,
        patches=torch.cat([e.patches for e in with_images]) if with_images else None,
        grid_hw=torch.cat([e.grid_hw for e in with_images]) if with_images else None,
        images_per_sample=torch.tensor([0 if e.grid_hw is None else len(e.grid_hw) for e in batch]),
        attention="causal",
    )
    # hidden row t predicts token t + 1: the continuation of item i is predicted by the rows
    # cu[i] + p_i - 1 ... cu[i] + p_i + k_i - 2
    rows = torch.cat(
        [torch.arange(len(e.target)) + cu[i] + len(e.prompt) - 1 for i, e in enumerate(batch)]
    ).to(out.hidden.device)
    targets = torch.cat([e.target for e in batch]).to(out.hidden.device)
    logprobs = model.lm_head(out.hidden[rows]).float().log_softmax(-1)
    picked = logprobs.gather(1, targets[:, None])[:, 0]
    greedy = logprobs.argmax(-1) == targets
    results, start = [], 0
    for e in batch:
        k = len(e.target)
        results.append((float(picked[start : start + k].sum()), bool(greedy[start : start + k].all())))
        start += k
    return results


@torch.no_grad()
def continuation_logprobs(
    model: VisionLanguageModel,
    items: Sequence[tuple[Sequence[Any] | None, str, str]],
    processor: Any = None,
    *,
    system: str | None = None,
    batch_size: int = 8,
) -> list[tuple[float, bool]]:
    """``(log p(continuation | images, context), is_greedy)`` for each ``(images, context,
    continuation)`` item, in item order (see the module docstring; docs/method.md §5).

    ``images``: None, one image or a list (PIL images, paths or bytes: whatever ``processor``,
    default ``model.processor``, takes). ``system``: the system turn of the rendered prompt.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    processor = processor or model.processor
    processed: dict[int, Any] = {}
    encoded = [_encode(model, processor, *item, system, processed) for item in items]
    results: list[tuple[float, bool]] = [(0.0, True)] * len(encoded)
    todo = sorted(
        (i for i, e in enumerate(encoded) if len(e.target)),
        key=lambda i: -(len(encoded[i].prompt) + len(encoded[i].target)),
    )
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(todo), batch_size):
            chunk = todo[start : start + batch_size]
            for i, res in zip(chunk, _score_batch(model, [encoded[i] for i in chunk])):
                results[i] = res
    finally:
        model.train(was_training)
    return results
