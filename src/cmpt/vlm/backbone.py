"""What every cmpt backbone shares: placeholder checks, packing, the text pass, parts (docs/method.md §3, §7).

Two backbones offer the same interface to the objectives (CoMP's, MoCa's) and the embedder:
:class:`~cmpt.vlm.model.VisionLanguageModel` (NativeViT → PatchMerger → any HF decoder) and
:class:`~cmpt.embed.qwen_vl.QwenVLBackbone` (a Hugging Face Qwen2-VL / Qwen2.5-VL). The logic that
does not depend on how images are encoded or how positions are numbered lives here, in
:class:`BackboneMixin`, so that both behave alike.

A class using the mixin provides ``config`` (with ``merge_size`` and ``image_pad_id``), the
attribute ``packing``, and the members ``body`` (the decoder without head), ``lm_head``,
``input_embeddings`` and ``attention_owner`` (the module whose config names the attention
implementation; its class name appears in packing errors), plus ``parts()``.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from cmpt.host_tensor import to_device_async
from cmpt.pooling import segment_mean
from cmpt.vlm.chat import IMAGE_PAD
from cmpt.vlm.packed_sdpa import implementation_for
from cmpt.vlm.text_attention import (
    AttentionMode,
    TextLayout,
    attn_implementation,
    body_inputs,
    packing_unsupported_reason,
    pad_rows,
    run_decoder_layer,
    set_attention_mode,
    unpad_rows,
)

__all__ = ["BackboneMixin"]

log = logging.getLogger("cmpt.vlm")


def enable_hf_checkpointing(model: nn.Module) -> None:
    """Non-reentrant activation checkpointing in a transformers model's layers, under whichever
    name this transformers release gives the switch."""
    if hasattr(model, "activation_checkpointing_enable"):  # newer transformers 5.x
        model.activation_checkpointing_enable({"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


class BackboneMixin:
    """Shared methods of cmpt's backbones (docs/method.md §3 "Backbones", §7)."""

    config: Any
    packing: bool
    body: nn.Module
    lm_head: nn.Module
    input_embeddings: nn.Module
    attention_owner: nn.Module
    device: torch.device
    #: ``varlen_attention`` backend of packed text (``cmpt.vision.attention.BACKENDS``; docs/method.md §7)
    text_attn: str = "auto"

    def parts(self) -> dict[str, list[nn.Parameter]]:  # pragma: no cover - provided by the class
        raise NotImplementedError

    # ------------------------------------------------------------------ LM head
    def _tied(self) -> bool:
        return self.lm_head.weight is self.input_embeddings.weight

    def _head_only_ids(self) -> set[int]:
        """Ids of the LM head's parameters that are not shared with the input embeddings."""
        head_ids = {id(p) for p in self.lm_head.parameters()}
        return head_ids - {id(p) for p in self.input_embeddings.parameters()}

    # ------------------------------------------------------------------ placeholders
    def embed_inputs(self, input_ids: torch.Tensor, vision_tokens: torch.Tensor | None) -> torch.Tensor:
        """Input embeddings (``input_ids.shape + (H,)``) with the merged vision tokens put, in order,
        at the ``<|image_pad|>`` positions; their counts must agree (``ValueError`` otherwise).
        ``input_ids`` may be on the host: counted there, copied to the device without waiting."""
        n_vision = 0 if vision_tokens is None else int(vision_tokens.shape[0])
        n_pad = int((input_ids == self.config.image_pad_id).sum())
        input_ids = to_device_async(input_ids, self.input_embeddings.weight.device)
        embeds = self.input_embeddings(input_ids)
        is_pad = input_ids == self.config.image_pad_id
        if n_pad != n_vision:
            raise ValueError(
                f"{n_pad} {IMAGE_PAD} placeholders but {n_vision} merged vision tokens "
                "(patches / merge_size²): render each image with num_image_tokens = h·w / merge_size² "
                "of its grid"
            )
        if n_vision:
            embeds = embeds.masked_scatter(is_pad.unsqueeze(-1), vision_tokens.to(embeds.dtype))
        return embeds

    def _check_placeholders(
        self,
        input_ids: torch.Tensor,
        layout: TextLayout,
        expected: list[int],
        sample_ids: Sequence[str] | None,
    ) -> None:
        """Every sequence has as many ``<|image_pad|>`` as merged tokens of its own images."""
        is_pad = (input_ids.reshape(-1) == self.config.image_pad_id).long()
        found = [int(x) for x in torch.stack([c.sum() for c in is_pad.split(layout.lengths)]).tolist()]
        if found != expected:
            ids = list(sample_ids) if sample_ids is not None else [str(i) for i in range(len(found))]
            bad = [
                f"sample {ids[i]!r}: {n} {IMAGE_PAD} vs {e} merged vision tokens"
                for i, (n, e) in enumerate(zip(found, expected))
                if n != e
            ]
            raise ValueError(
                f"image placeholder / vision token mismatch ({'; '.join(bad)}): render each image with "
                "num_image_tokens = h·w / merge_size² of its grid"
            )

    def _tokens_per_sample(
        self, grid_hw: torch.Tensor | Sequence[Sequence[int]], images_per_sample: torch.Tensor | Sequence[int]
    ) -> list[int]:
        """Merged-token count of every sample from the image grids (host side; a tensor is read once)."""
        m2 = self.config.merge_size**2
        pairs = grid_hw.tolist() if torch.is_tensor(grid_hw) else grid_hw
        per_image = [int(h) * int(w) // m2 for h, w in pairs]
        out, start = [], 0
        counts = images_per_sample.tolist() if torch.is_tensor(images_per_sample) else images_per_sample
        for k in counts:
            out.append(sum(per_image[start : start + int(k)]))
            start += int(k)
        if start != len(per_image):
            raise ValueError(f"images_per_sample sums to {start} but grid_hw has {len(per_image)} images")
        return out

    # ------------------------------------------------------------------ attention and packing
    def configure_packing(self, requested: bool | None = None) -> bool:
        """Choose packed (one row, block-diagonal attention) or padded text (docs/method.md §7).

        ``None``: packed where the body supports it, else padded with one log line saying why;
        ``True`` on a body that cannot pack raises ``ValueError`` naming the reason.
        """
        reason = packing_unsupported_reason(self.attention_owner, self.body)
        if requested and reason:
            raise ValueError(
                f"data.packing=true, but {type(self.attention_owner).__name__} cannot pack: {reason}"
            )
        self.packing = bool(requested if requested is not None else reason is None)
        if requested is None and reason:
            log.info("text runs right-padded (no packing): %s", reason)
        impl = attn_implementation(self.attention_owner)
        wanted = implementation_for(impl, self.packing)
        if wanted != impl:  # sdpa runs packed rows per sequence, without an N×N mask
            self.body.set_attn_implementation(wanted)
        return self.packing

    def text_hidden(
        self,
        embeds: torch.Tensor,
        layout: TextLayout,
        attention: AttentionMode = "causal",
        position_ids: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        """Last hidden states (after the final norm), ``(N, H)``, of packed input embeddings
        ``(N, H)`` whose sequences are ``layout``, and the mask / position arguments the body ran
        with (for :meth:`run_layer`) (docs/method.md §7). ``position_ids`` (in the body's own shape,
        for the layout's rows) replace the default 1-D positions that restart at every sequence."""
        if embeds.shape[0] != layout.total:
            raise ValueError(
                f"{embeds.shape[0]} token embeddings for sequences of total length {layout.total}"
            )
        set_attention_mode(self.body, attention)
        impl = attn_implementation(self.attention_owner)
        kwargs = body_inputs(layout, impl, attention, embeds.dtype, embeds.device, self.text_attn)
        if position_ids is not None:
            kwargs["position_ids"] = position_ids
        rows = embeds.unsqueeze(0) if layout.packed else pad_rows(embeds, layout)
        hidden = self.body(inputs_embeds=rows, use_cache=False, **kwargs).last_hidden_state
        return (hidden[0] if layout.packed else unpad_rows(hidden, layout)), kwargs

    def run_layer(self, layer: nn.Module, hidden: torch.Tensor, out: Any) -> torch.Tensor:
        """One extra decoder ``layer`` (e.g. MoCa's MAE decoder, a copy of a body layer) over
        ``hidden`` ``(N, H)`` with the mask, attention mode and positions of ``out``'s forward
        (a ``VLMOutput``)."""
        return run_decoder_layer(self.body, layer, hidden, out.layout, out.body_kwargs)

    @torch.no_grad()
    def text_features(
        self,
        input_ids: torch.Tensor,
        cu_seqlens: torch.Tensor | Sequence[int],
        attention: AttentionMode = "causal",
    ) -> torch.Tensor:
        """Mean of the last hidden states (after the final norm) over each text sequence, ``(B, H)``,
        without gradient: CoMP's caption feature ``F_t`` before normalization (docs/method.md §2)."""
        layout = TextLayout.from_cu_seqlens(cu_seqlens, self.packing)
        ids = to_device_async(input_ids.reshape(-1), self.device)
        hidden, _ = self.text_hidden(self.input_embeddings(ids), layout, attention)
        return segment_mean(hidden, list(layout.lengths))

    # ------------------------------------------------------------------ recipes
    def set_trainable(self, parts: Sequence[str]) -> None:
        """``requires_grad = True`` for the parameters of ``parts``, False for all others.

        With a tied head, asking for ``lm_head`` without ``llm`` trains nothing of the head (its
        weight belongs to ``llm``); a warning says so.
        """
        groups = self.parts()
        unknown = set(parts) - set(groups)
        if unknown:
            raise ValueError(f"unknown parts {sorted(unknown)}; choose from {sorted(groups)}")
        if "lm_head" in parts and "llm" not in parts and self._tied():
            warnings.warn(
                "the LM head is tied to the input embeddings, which belong to the 'llm' part; "
                "set_trainable(['lm_head']) without 'llm' leaves the tied weight frozen",
                stacklevel=2,
            )
        for name, params in groups.items():
            for p in params:
                p.requires_grad_(name in parts)
