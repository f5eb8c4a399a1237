"""Greedy generation for :class:`~cmpt.vlm.model.VisionLanguageModel` (docs/method.md §2, §5 VQA evaluation).

Each item ``(images, prompt)`` is rendered with :func:`~cmpt.vlm.chat.render_prompt` (one user turn
+ the assistant header), its images are processed with the model's ``ImageProcessor``, and the
prompts are **left-padded** into one batch so that every row's next token sits at the last
position. The merged vision tokens are scattered into the input embeddings exactly as in training,
and Hugging Face ``generate(inputs_embeds=..., attention_mask=...)`` decodes greedily (it derives
position ids from the attention mask, so left padding does not shift positions).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from cmpt.vlm.chat import render_prompt
from cmpt.vlm.packed_sdpa import standard_attention
from cmpt.vlm.text_attention import set_attention_mode

if TYPE_CHECKING:
    from cmpt.vision.processor import ImageProcessor
    from cmpt.vlm.model import VisionLanguageModel

__all__ = ["end_of_turn_ids", "generate_batch"]


def end_of_turn_ids(model: VisionLanguageModel) -> list[int]:
    """Token ids that stop generation: the generation config's eos id(s), the tokenizer's eos and
    ``<|im_end|>`` when the tokenizer has it."""
    tok = model.tokenizer
    ids: list[int] = []
    gen_eos = getattr(model.llm.generation_config, "eos_token_id", None)
    for i in (*(gen_eos if isinstance(gen_eos, (list, tuple)) else [gen_eos]), tok.eos_token_id):
        if i is not None and int(i) not in ids:
            ids.append(int(i))
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    if isinstance(im_end, int) and im_end != tok.unk_token_id and im_end not in ids:
        ids.append(im_end)
    return ids


def generate_batch(
    model: VisionLanguageModel,
    items: Sequence[tuple[Sequence[Any] | None, str]],
    processor: ImageProcessor | None,
    max_new_tokens: int = 64,
    system: str | None = None,
) -> list[str]:
    """Greedy answers (new text only, special tokens skipped) for ``(images, prompt)`` items.

    ``images`` is None, one image or a list of images (PIL, paths, bytes, numpy arrays or tensors:
    whatever ``processor`` takes).
    """
    if not items:
        return []
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    tok, m2 = model.tokenizer, model.config.merge_size**2
    prompts, patches, grids = [], [], []
    for images, prompt in items:
        n_tokens: list[int] = []
        if images is not None and not (isinstance(images, (list, tuple)) and not images):  # an array too
            if processor is None:
                raise ValueError(
                    "generate with images needs an ImageProcessor (processor= or model.processor)"
                )
            packed = processor(list(images) if isinstance(images, (list, tuple)) else [images])
            patches.append(packed.patches)
            grids.append(packed.grid_hw)
            n_tokens = [int(h) * int(w) // m2 for h, w in packed.grid_hw.tolist()]
        prompts.append(render_prompt(prompt, tok, n_tokens, system=system))

    dev = model.device
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):  # left padding
        input_ids[i, width - len(p) :], attention_mask[i, width - len(p) :] = p, 1
    input_ids, attention_mask = input_ids.to(dev), attention_mask.to(dev)

    was_training = model.training
    model.eval()
    set_attention_mode(model.body, "causal")  # decoding is causal whatever the last forward used
    try:
        with standard_attention(model.body):
            vision = model.encode_images(torch.cat(patches), torch.cat(grids)) if patches else None
            embeds = model.embed_inputs(input_ids, vision)
            eos = end_of_turn_ids(model)
            out = model.llm.generate(
                inputs_embeds=embeds,
                attention_mask=attention_mask,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                num_beams=1,
                eos_token_id=eos,
                pad_token_id=pad_id,
            )
    finally:
        model.train(was_training)
    # With inputs_embeds only, HF returns just the new tokens; cut each row at its first stop token.
    texts = []
    for row in out.tolist():
        stop = next((j for j, t in enumerate(row) if t in eos), len(row))
        texts.append(tok.decode(row[:stop], skip_special_tokens=True))
    return texts
