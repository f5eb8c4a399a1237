"""The vision-language model: NativeViT → PatchMerger → any Hugging Face decoder (docs/method.md §2, §7).

A pure model — it computes no loss. :meth:`VisionLanguageModel.forward`::

    patches (P, 3·p·p), grid_hw (n, 2) ──NativeViT──▶ (P, D_vit) ──PatchMerger──▶ (P / m², H)
    input_ids (N,) cut by cu_seqlens ──LLM input embeddings──▶ (N, H) ◀── merged tokens scattered,
                                                         in order, into the <|image_pad|> positions
    ──LLM body, attention "causal" | "bidirectional", packed or padded──▶ last hidden states (N, H)

Objectives (CoMP's next-token and alignment losses, MoCa's masked reconstruction) live in the
recipes and read the LM head through :attr:`VisionLanguageModel.lm_head`.

Decisions:

* **Dtypes.** The LLM is loaded in float32 unless ``dtype`` is given (``transformers`` 5 would
  otherwise use the checkpoint's dtype); mixed precision is the trainer's business (autocast or
  ``.to(bf16)``). Merged tokens are cast to the embedding dtype before the scatter.
* **Mode.** :meth:`build` / :meth:`from_pretrained` return the model in eval mode (like
  ``transformers``); the trainer calls ``.train()``. The dummy image (docs/method.md §6) is used
  only in train mode with gradients enabled.
* **Text layout.** Sequences run packed in one row where the body supports it (``packing``,
  :meth:`configure_packing`), else right-padded; outputs are one row per real token either way.
* **Tied LM head.** When the LM head shares its weight with the input embeddings (Qwen2.5), the
  shared tensor belongs to the ``llm`` part only; the ``lm_head`` part is then empty (or holds
  just a bias). See :meth:`parts`.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cmpt.losses import segment_mean
from cmpt.vision.vit import NativeViT
from cmpt.vlm.chat import IMAGE_PAD
from cmpt.vlm.io import VLMConfig, build_vlm, load_vlm, save_vlm
from cmpt.vlm.merger import PatchMerger
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

__all__ = ["VLMConfig", "VLMOutput", "VisionLanguageModel"]

log = logging.getLogger("cmpt.vlm")


@dataclass
class VLMOutput:
    """What :meth:`VisionLanguageModel.forward` returns."""

    hidden: torch.Tensor  # (N, H) last hidden states (after the final norm), one row per real token
    vision: torch.Tensor | None  # (P / m², H) merged vision tokens in LLM space, or None
    vision_per_sample: list[int] | None  # merged tokens of each sequence (with images_per_sample)
    layout: TextLayout  # the sequences' lengths and whether they ran packed
    body_kwargs: dict[str, Any]  # mask and positions the body ran with (see VisionLanguageModel.run_layer)


class VisionLanguageModel(nn.Module):
    """NativeViT → PatchMerger → Hugging Face decoder; hidden states, no loss (docs/method.md §2, §7).

    Attributes: ``vit`` (:class:`NativeViT`), ``merger`` (:class:`PatchMerger`), ``llm`` (the
    ``*ForCausalLM``), ``tokenizer``, ``processor`` (an optional ``ImageProcessor`` used by
    :meth:`generate` and saved with the model), ``config`` (:class:`VLMConfig`), ``packing``
    (text runs packed in one row; :meth:`configure_packing`).
    """

    def __init__(
        self,
        vit: NativeViT,
        merger: PatchMerger,
        llm: nn.Module,
        tokenizer,
        config: VLMConfig,
        processor=None,
    ) -> None:
        super().__init__()
        self.vit, self.merger, self.llm = vit, merger, llm
        self.tokenizer, self.processor, self.config = tokenizer, processor, config
        if merger.merge_size != config.merge_size or vit.config.merge_size != config.merge_size:
            raise ValueError(
                f"merge sizes disagree: VLMConfig {config.merge_size}, PatchMerger {merger.merge_size}, "
                f"NativeViT {vit.config.merge_size}"
            )
        self.packing = packing_unsupported_reason(llm, self.body) is None

    # ------------------------------------------------------------------ construction (cmpt.vlm.io)
    build = classmethod(build_vlm)

    # ------------------------------------------------------------------ pieces
    @property
    def device(self) -> torch.device:
        return self.llm.get_input_embeddings().weight.device

    @property
    def body(self) -> nn.Module:
        """The LLM without its head (``Qwen2Model``, ``LlamaModel``, ...): returns last hidden states."""
        return self.llm.get_decoder()

    @property
    def lm_head(self) -> nn.Module:
        return self.llm.get_output_embeddings()

    def _tied(self) -> bool:
        return self.lm_head.weight is self.llm.get_input_embeddings().weight

    def encode_images(self, patches: torch.Tensor, grid_hw: torch.Tensor) -> torch.Tensor:
        """Packed patches (N, 3·p·p) + grids (n, 2) → merged vision tokens (N / m², H) in LLM space."""
        feats = self.vit(patches.to(self.device), grid_hw)
        return self.merger(feats)

    def _dummy_vision(self) -> torch.Tensor:
        """Merged tokens of an all-zero 2m×2m-patch image (4×4 for m = 2), docs/method.md §6."""
        m, p = self.config.merge_size, self.vit.config.patch_size
        patches = torch.zeros(4 * m * m, 3 * p * p, device=self.device)
        return self.encode_images(patches, torch.tensor([[2 * m, 2 * m]]))

    def embed_inputs(self, input_ids: torch.Tensor, vision_tokens: torch.Tensor | None) -> torch.Tensor:
        """Input embeddings (``input_ids.shape + (H,)``) with the merged vision tokens put, in order,
        at the ``<|image_pad|>`` positions; their counts must agree (``ValueError`` otherwise)."""
        embeds = self.llm.get_input_embeddings()(input_ids)
        is_pad = input_ids == self.config.image_pad_id
        n_vision = 0 if vision_tokens is None else int(vision_tokens.shape[0])
        n_pad = int(is_pad.sum())
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

    def _tokens_per_sample(self, grid_hw: torch.Tensor, images_per_sample: torch.Tensor) -> list[int]:
        """Merged-token count of every sample from the image grids (host side)."""
        m2 = self.config.merge_size**2
        per_image = [int(h) * int(w) // m2 for h, w in grid_hw.tolist()]
        out, start = [], 0
        for k in images_per_sample.tolist():
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
        reason = packing_unsupported_reason(self.llm, self.body)
        if requested and reason:
            raise ValueError(f"data.packing=true, but {type(self.llm).__name__} cannot pack: {reason}")
        self.packing = bool(requested if requested is not None else reason is None)
        if requested is None and reason:
            log.info("text runs right-padded (no packing): %s", reason)
        return self.packing

    def text_hidden(
        self, embeds: torch.Tensor, layout: TextLayout, attention: AttentionMode = "causal"
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        """Last hidden states (after the final norm), ``(N, H)``, of packed input embeddings
        ``(N, H)`` whose sequences are ``layout``, and the mask / position arguments the body ran
        with (for :meth:`run_layer`) (docs/method.md §7)."""
        if embeds.shape[0] != layout.total:
            raise ValueError(
                f"{embeds.shape[0]} token embeddings for sequences of total length {layout.total}"
            )
        set_attention_mode(self.body, attention)
        kwargs = body_inputs(layout, attn_implementation(self.llm), attention, embeds.dtype, embeds.device)
        rows = embeds.unsqueeze(0) if layout.packed else pad_rows(embeds, layout)
        hidden = self.body(inputs_embeds=rows, use_cache=False, **kwargs).last_hidden_state
        return (hidden[0] if layout.packed else unpad_rows(hidden, layout)), kwargs

    def run_layer(self, layer: nn.Module, hidden: torch.Tensor, out: VLMOutput) -> torch.Tensor:
        """One extra decoder ``layer`` (e.g. MoCa's MAE decoder, a copy of a body layer) over
        ``hidden`` ``(N, H)`` with the mask, attention mode and positions of ``out``'s forward."""
        return run_decoder_layer(self.body, layer, hidden, out.layout, out.body_kwargs)

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        input_ids: torch.Tensor,
        cu_seqlens: torch.Tensor | Sequence[int],
        *,
        patches: torch.Tensor | None = None,
        grid_hw: torch.Tensor | None = None,
        images_per_sample: torch.Tensor | None = None,
        attention: AttentionMode = "causal",
        sample_ids: Sequence[str] | None = None,
    ) -> VLMOutput:
        """Hidden states of a micro-batch (docs/method.md §2 "Assembly", §7); computes no loss.

        ``input_ids`` ``(N,)``: the batch's sequences concatenated, cut by ``cu_seqlens`` ``(B + 1,)``
        (the collate contract of :func:`cmpt.data.pipeline.collate`); ``patches`` / ``grid_hw``: the
        images of all sequences, packed; ``images_per_sample`` ``(B,)``: how many belong to each
        sequence (checked against its placeholders). In training with gradients, a batch without
        images still runs the dummy image through the ViT and merger (docs/method.md §6).
        """
        input_ids = input_ids.to(self.device).reshape(-1)
        layout = TextLayout.from_cu_seqlens(cu_seqlens, self.packing)
        vision, per_sample = None, None
        if patches is not None and grid_hw is not None and grid_hw.shape[0] > 0:
            vision = self.encode_images(patches, grid_hw)
            if images_per_sample is not None:
                per_sample = self._tokens_per_sample(grid_hw, images_per_sample)
        elif images_per_sample is not None and int(images_per_sample.sum()) > 0:
            raise ValueError("images_per_sample counts images but the batch has no patches / grid_hw")
        if per_sample is not None or images_per_sample is not None:
            self._check_placeholders(input_ids, layout, per_sample or [0] * len(layout.lengths), sample_ids)
        embeds = self.embed_inputs(input_ids, vision)
        if vision is None and self.training and torch.is_grad_enabled():
            embeds = embeds + 0.0 * self._dummy_vision().sum()  # every ViT/merger parameter used (§6)
        hidden, kwargs = self.text_hidden(embeds, layout, attention)
        return VLMOutput(hidden, vision, per_sample, layout, kwargs)

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
        ids = input_ids.to(self.device).reshape(-1)
        hidden, _ = self.text_hidden(self.llm.get_input_embeddings()(ids), layout, attention)
        return segment_mean(hidden, list(layout.lengths))

    # ------------------------------------------------------------------ generation
    @torch.no_grad()
    def generate(
        self,
        images: Sequence[Any] | None = None,
        prompt: str = "",
        *,
        processor=None,
        max_new_tokens: int = 64,
        system: str | None = None,
    ) -> str:
        """Greedy answer to ``prompt`` about ``images`` (PIL images, paths or bytes); new text only.

        Missing ``<image>`` placeholders are put at the start of the prompt (``render_prompt``).
        """
        return self.generate_batch(
            [(images, prompt)], processor=processor, max_new_tokens=max_new_tokens, system=system
        )[0]

    @torch.no_grad()
    def generate_batch(
        self,
        items: Sequence[tuple[Sequence[Any] | None, str]],
        *,
        processor=None,
        max_new_tokens: int = 64,
        system: str | None = None,
    ) -> list[str]:
        """Batched greedy decoding of ``(images, prompt)`` items, left-padded (for VQA evaluation)."""
        from cmpt.vlm.generate import generate_batch

        return generate_batch(self, items, processor or self.processor, max_new_tokens, system)

    # ------------------------------------------------------------------ recipes
    def parts(self) -> dict[str, list[nn.Parameter]]:
        """Parameters by part for recipes (docs/method.md §2.1): ``vision``, ``merger``, ``llm``, ``lm_head``.

        ``llm`` = the LLM body including the input embeddings. A weight tied between the LM head and
        the input embeddings is listed in ``llm`` only (``lm_head`` is then empty, or just a bias);
        every parameter is in exactly one part.
        """
        head_ids = {id(p) for p in self.lm_head.parameters()}
        embed_ids = {id(p) for p in self.llm.get_input_embeddings().parameters()}
        head_only = head_ids - embed_ids
        return {
            "vision": list(self.vit.parameters()),
            "merger": list(self.merger.parameters()),
            "llm": [p for p in self.llm.parameters() if id(p) not in head_only],
            "lm_head": [p for p in self.lm_head.parameters() if id(p) in head_only],
        }

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

    def fsdp_units(self) -> list[nn.Module]:
        """Modules to wrap one by one with FSDP2 ``fully_shard``: ViT blocks, then LLM decoder layers.

        Everything else (embeddings, LM head, norms, merger, ViT stem) must stay in the root unit:
        objectives read ``lm_head.weight`` directly, without calling the head module.
        """
        layers = getattr(self.body, "layers", None)
        if not isinstance(layers, nn.ModuleList):
            n = getattr(self.llm.config, "num_hidden_layers", None)
            layers = next(
                (m for m in self.body.modules() if isinstance(m, nn.ModuleList) and len(m) == n), None
            )
            if layers is None:
                raise ValueError(f"cannot find the decoder layers of {type(self.llm).__name__}")
        return [*self.vit.blocks, *layers]

    def enable_gradient_checkpointing(self) -> None:
        """Activation checkpointing in the ViT blocks and the LLM decoder layers."""
        self.vit.grad_checkpointing = True
        if hasattr(self.llm, "activation_checkpointing_enable"):  # transformers >= 5.x
            self.llm.activation_checkpointing_enable({"use_reentrant": False})
        else:
            self.llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    # ------------------------------------------------------------------ I/O (cmpt.vlm.io)
    save_pretrained = save_vlm
    from_pretrained = classmethod(load_vlm)

    def export_vit(self, directory: str | Path) -> Path:
        """Write the ViT alone as a NativeViT directory (CoMP-VFM, ``NativeViT.from_pretrained``)."""
        self.vit.save_pretrained(directory)
        return Path(directory)
