"""The CoMP vision-language model: NativeViT → PatchMerger → any Hugging Face causal LM (SPEC §2).

Data flow of :meth:`VisionLanguageModel.forward`::

    patches (N, 3·p·p), grid_hw (n, 2) ──NativeViT──▶ (N, D_vit) ──PatchMerger──▶ (N / m², H)
    input_ids (B, T) ──LLM input embeddings──▶ (B, T, H) ◀── merged tokens scattered, in order,
                                                            into the <|image_pad|> positions
    ──LLM body (no LM head)──▶ last hidden states ──▶ next_token_loss (logits at supervised rows only)

The model returns *un-normalized* loss sums and their counts, so that a trainer can normalize by
global counts across ranks (SPEC §6 "Loss normalization"): ``L = Σlm / N_lm + λ · Σalign / N_align``.

Decisions:

* **Dtypes.** The LLM is loaded in float32 unless ``dtype`` is given (``transformers`` 5 would
  otherwise use the checkpoint's dtype); mixed precision is the trainer's business (autocast or
  ``.to(bf16)``). Merged tokens are cast to the embedding dtype before the scatter.
* **Mode.** :meth:`build` / :meth:`from_pretrained` return the model in eval mode (like
  ``transformers``); the trainer calls ``.train()``. The dummy image (SPEC §6) is used only in
  train mode with gradients enabled.
* **Alignment text path.** The caption runs through the LLM body under ``torch.no_grad()`` in
  whatever mode the model is in (train mode during training, as the official code does: the text
  feature is the same network the LM loss trains; the Qwen2/Llama bodies have no active dropout).
* **Tied LM head.** When the LM head shares its weight with the input embeddings (Qwen2.5), the
  shared tensor belongs to the ``llm`` part only; the ``lm_head`` part is then empty (or holds
  just a bias). See :meth:`parts`.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cmpt.losses import alignment_loss, masked_mean, next_token_loss, segment_mean
from cmpt.vision.vit import NativeViT
from cmpt.vlm.chat import IMAGE_PAD
from cmpt.vlm.io import VLMConfig, build_vlm, load_vlm, save_vlm
from cmpt.vlm.merger import PatchMerger

__all__ = ["VLMConfig", "VisionLanguageModel"]


class VisionLanguageModel(nn.Module):
    """NativeViT → PatchMerger → Hugging Face causal LM, with CoMP's ``L_dec`` and ``L_align`` (SPEC §2).

    Attributes: ``vit`` (:class:`NativeViT`), ``merger`` (:class:`PatchMerger`), ``llm`` (the
    ``*ForCausalLM``), ``tokenizer``, ``processor`` (an optional ``ImageProcessor`` used by
    :meth:`generate` and saved with the model), ``config`` (:class:`VLMConfig`).
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
        """Merged tokens of an all-zero 2m×2m-patch image (4×4 for m = 2), SPEC §6."""
        m, p = self.config.merge_size, self.vit.config.patch_size
        patches = torch.zeros(4 * m * m, 3 * p * p, device=self.device)
        return self.encode_images(patches, torch.tensor([[2 * m, 2 * m]]))

    def embed_inputs(
        self,
        input_ids: torch.Tensor,
        vision_tokens: torch.Tensor | None,
        tokens_per_sample: Sequence[int] | None = None,
        sample_ids: Sequence[str] | None = None,
    ) -> torch.Tensor:
        """Input embeddings (B, T, H) with the merged vision tokens put, in order, at ``<|image_pad|>``.

        The number of ``<|image_pad|>`` placeholders must equal the number of merged tokens, per
        sample when ``tokens_per_sample`` is given, else in total; otherwise a ``ValueError`` names
        the samples and both counts.
        """
        embeds = self.llm.get_input_embeddings()(input_ids)
        is_pad = input_ids == self.config.image_pad_id
        n_vision = 0 if vision_tokens is None else int(vision_tokens.shape[0])
        per_sample = is_pad.sum(dim=1).tolist()
        expected = list(tokens_per_sample) if tokens_per_sample is not None else None
        if sum(per_sample) != n_vision or (expected is not None and per_sample != expected):
            ids = list(sample_ids) if sample_ids is not None else [str(i) for i in range(len(per_sample))]
            if expected is not None and len(expected) == len(per_sample):
                bad = [
                    f"sample {ids[i]!r}: {n} {IMAGE_PAD} vs {e} merged vision tokens"
                    for i, (n, e) in enumerate(zip(per_sample, expected))
                    if n != e
                ]
            else:
                bad = [f"samples {ids}"]
            raise ValueError(
                f"image placeholder / vision token mismatch ({'; '.join(bad)}; total {sum(per_sample)} "
                f"{IMAGE_PAD} vs {n_vision} merged tokens = patches / merge_size²): render each image "
                "with num_image_tokens = h·w / merge_size² of its grid"
            )
        if n_vision:
            embeds = embeds.masked_scatter(is_pad.unsqueeze(-1), vision_tokens.to(embeds.dtype))
        return embeds

    def _tokens_per_sample(
        self, grid_hw: torch.Tensor, images_per_sample: torch.Tensor | None
    ) -> list[int] | None:
        """Merged-token count of every sample from the image grids (host side), None without
        ``images_per_sample``."""
        if images_per_sample is None:
            return None
        m2 = self.config.merge_size**2
        per_image = [int(h) * int(w) // m2 for h, w in grid_hw.tolist()]
        out, start = [], 0
        for k in images_per_sample.tolist():
            out.append(sum(per_image[start : start + int(k)]))
            start += int(k)
        if start != len(per_image):
            raise ValueError(f"images_per_sample sums to {start} but grid_hw has {len(per_image)} images")
        return out

    @torch.no_grad()
    def caption_features(self, caption_ids: torch.Tensor, caption_mask: torch.Tensor) -> torch.Tensor:
        """``F_t`` before normalization (SPEC §2): the caption alone (no image, no template) through the
        LLM body without gradient, last hidden state (after the final norm) mean-pooled over non-pad
        tokens. Positions count valid tokens only, so left- or right-padded captions give the same."""
        mask = caption_mask.to(self.device)
        pos = (mask.long().cumsum(dim=1) - 1).clamp(min=0)
        out = self.body(
            input_ids=caption_ids.to(self.device), attention_mask=mask, position_ids=pos, use_cache=False
        )
        return masked_mean(out.last_hidden_state, mask)

    # ------------------------------------------------------------------ training forward
    def forward(
        self, batch: dict[str, Any], *, align: bool = False, vocab_counts: torch.Tensor | None = None
    ) -> dict[str, Any]:
        """Loss sums of one batch (SPEC §2): ``{"lm_sum", "lm_count", "align_sum", "align_count"}``.

        ``batch`` follows the collate contract (``input_ids``, ``attention_mask``, ``labels`` not
        shifted, ``patches``, ``grid_hw``, ``images_per_sample``, and for ``align=True``
        ``caption_ids`` / ``caption_mask``; ``sample_ids`` for error messages). ``vocab_counts``
        (V_tok,) are the prior counts of ``L_align`` (zero-padded to the LM-head rows; None =
        uniform prior). ``align_count`` = samples with ≥ 1 image and a non-empty caption.
        """
        dev = self.device
        input_ids = batch["input_ids"].to(dev)
        patches, grid_hw = batch.get("patches"), batch.get("grid_hw")
        has_images = patches is not None and grid_hw is not None and grid_hw.shape[0] > 0
        images_per_sample = batch.get("images_per_sample")
        vision = per_sample = None
        if has_images:
            vision = self.encode_images(patches, grid_hw)
            per_sample = self._tokens_per_sample(grid_hw, images_per_sample)
        elif images_per_sample is not None and int(images_per_sample.sum()) > 0:
            raise ValueError("images_per_sample counts images but the batch has no patches / grid_hw")
        embeds = self.embed_inputs(input_ids, vision, per_sample, batch.get("sample_ids"))
        hidden = self.body(
            inputs_embeds=embeds, attention_mask=batch["attention_mask"].to(dev), use_cache=False
        ).last_hidden_state
        head = self.lm_head
        lm_sum, lm_count = next_token_loss(
            hidden, batch["labels"].to(dev), head.weight, head.bias, chunk_size=self.config.lm_chunk_size
        )
        if vision is None and self.config.dummy_image and self.training and torch.is_grad_enabled():
            lm_sum = lm_sum + 0.0 * self._dummy_vision().sum()  # every ViT/merger parameter used (§6)

        align_sum, align_count = None, 0
        if align:
            align_sum, align_count = self._align(batch, vision, per_sample, vocab_counts)
        if align_sum is None:  # a zero connected to the graph (DDP/FSDP see the same parameters)
            align_sum = (vision.sum() if vision is not None else lm_sum) * 0.0
        return {"lm_sum": lm_sum, "lm_count": lm_count, "align_sum": align_sum, "align_count": align_count}

    def _align(
        self,
        batch: dict[str, Any],
        vision: torch.Tensor | None,
        per_sample: list[int] | None,
        vocab_counts: torch.Tensor | None,
    ) -> tuple[torch.Tensor | None, int]:
        """``L_align · count`` over the samples with an image and a caption (SPEC §2), or (None, 0)."""
        if "caption_ids" not in batch or "caption_mask" not in batch:
            raise ValueError("align=True needs caption_ids and caption_mask in the batch")
        if vision is None:
            return None, 0
        if per_sample is None:
            raise ValueError("align=True needs images_per_sample in the batch (images of each sample)")
        cap_mask = batch["caption_mask"]
        keep = [i for i, (n, c) in enumerate(zip(per_sample, (cap_mask != 0).any(1).tolist())) if n > 0 and c]
        if not keep:
            return None, 0
        vision_feats = segment_mean(vision, per_sample)[keep]
        idx = torch.tensor(keep, device=cap_mask.device)
        text_feats = self.caption_features(batch["caption_ids"][idx], cap_mask[idx])
        prototypes = self.lm_head.weight
        if vocab_counts is not None:
            vocab_counts = self._pad_counts(vocab_counts, prototypes.shape[0])
        c = self.config
        loss = alignment_loss(
            vision_feats,
            text_feats,
            prototypes,
            vocab_counts,
            vision_temp=c.vision_temp,
            sinkhorn_eps=c.sinkhorn_eps,
            prior_temp=c.prior_temp,
            iters=c.sinkhorn_iters,
            variant=c.sinkhorn_variant,
        )
        return loss * len(keep), len(keep)

    @staticmethod
    def _pad_counts(counts: torch.Tensor, vocab: int) -> torch.Tensor:
        """Zero-pad token counts to the LM-head rows (tokens appended after counting, padded heads)."""
        if counts.shape[0] > vocab:
            raise ValueError(f"vocab_counts has {counts.shape[0]} entries but the LM head only {vocab} rows")
        if counts.shape[0] < vocab:
            counts = torch.cat([counts, counts.new_zeros(vocab - counts.shape[0])])
        return counts

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
        """Parameters by part for recipes (SPEC §2.1): ``vision``, ``merger``, ``llm``, ``lm_head``.

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
        :meth:`forward` reads ``lm_head.weight`` directly, without calling the head module.
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
