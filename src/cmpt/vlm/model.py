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

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from cmpt.host_tensor import to_device_async
from cmpt.vision.vit import NativeViT
from cmpt.vlm.backbone import BackboneMixin, enable_hf_checkpointing
from cmpt.vlm.io import VLMConfig, build_vlm, load_vlm, resize_vocab, save_vlm
from cmpt.vlm.merger import PatchMerger
from cmpt.vlm.text_attention import AttentionMode, TextLayout

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from cmpt.vision.processor import ImageProcessor

__all__ = ["VLMConfig", "VLMOutput", "VisionLanguageModel"]


@dataclass
class VLMOutput:
    """What :meth:`VisionLanguageModel.forward` returns."""

    hidden: torch.Tensor  # (N, H) last hidden states (after the final norm), one row per real token
    vision: torch.Tensor | None  # (P / m², H) merged vision tokens in LLM space, or None
    vision_per_sample: list[int] | None  # merged tokens of each sequence (with images_per_sample)
    layout: TextLayout  # the sequences' lengths and whether they ran packed
    body_kwargs: dict[str, Any]  # mask and positions the body ran with (see VisionLanguageModel.run_layer)


class VisionLanguageModel(BackboneMixin, nn.Module):
    """NativeViT → PatchMerger → Hugging Face decoder; hidden states, no loss (docs/method.md §2, §7).

    Attributes: ``vit`` (:class:`NativeViT`), ``merger`` (:class:`PatchMerger`), ``llm`` (the
    ``*ForCausalLM``), ``tokenizer``, ``processor`` (an optional ``ImageProcessor`` used by
    :meth:`generate` and saved with the model), ``config`` (:class:`VLMConfig`), ``packing``
    (text runs packed in one row; :meth:`configure_packing`). :meth:`embed_inputs`, placeholder
    checks, packing, the text pass, :meth:`run_layer`, :meth:`text_features` and
    :meth:`set_trainable` come from :class:`~cmpt.vlm.backbone.BackboneMixin`, shared with
    ``QwenVLBackbone``.
    """

    def __init__(
        self,
        vit: NativeViT,
        merger: PatchMerger,
        llm: nn.Module,
        tokenizer: PreTrainedTokenizerBase,
        config: VLMConfig,
        processor: ImageProcessor | None = None,
    ) -> None:
        super().__init__()
        self.vit, self.merger, self.llm = vit, merger, llm
        self.tokenizer, self.processor, self.config = tokenizer, processor, config
        if merger.merge_size != config.merge_size or vit.config.merge_size != config.merge_size:
            raise ValueError(
                f"merge sizes disagree: VLMConfig {config.merge_size}, PatchMerger {merger.merge_size}, "
                f"NativeViT {vit.config.merge_size}"
            )
        self.configure_packing(None)

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

    @property
    def input_embeddings(self) -> nn.Module:
        return self.llm.get_input_embeddings()

    @property
    def attention_owner(self) -> nn.Module:
        """The module whose config names the attention implementation (the ``*ForCausalLM``)."""
        return self.llm

    @property
    def patch_dim(self) -> int:
        """Length of one patch row the ViT reads (``3·p·p``): what MoCa's MAE reconstructs."""
        return 3 * self.vit.config.patch_size**2

    def prepare_patches(self, patches: torch.Tensor) -> torch.Tensor:
        """The processor's rows in this model's own patch format (for cmpt's ViT: unchanged)."""
        return patches

    def resize_token_embeddings(self, vocab_size: int) -> None:
        """Grow the LLM's input embeddings (and untied head) to ``vocab_size`` rows (added tokens;
        :func:`cmpt.vlm.io.resize_vocab`)."""
        resize_vocab(self.llm, vocab_size)

    def encode_images(self, patches: torch.Tensor, grid_hw: torch.Tensor) -> torch.Tensor:
        """Packed patches (N, 3·p·p) + grids (n, 2) → merged vision tokens (N / m², H) in LLM space."""
        feats = self.vit(to_device_async(patches, self.device), grid_hw)
        return self.merger(feats)

    def _dummy_vision(self) -> torch.Tensor:
        """Merged tokens of an all-zero 2m×2m-patch image (4×4 for m = 2), docs/method.md §6."""
        m, p = self.config.merge_size, self.vit.config.patch_size
        patches = torch.zeros(4 * m * m, 3 * p * p, device=self.device)
        return self.encode_images(patches, torch.tensor([[2 * m, 2 * m]]))

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
        sequence (checked against its placeholders). ``input_ids``, ``cu_seqlens``, ``grid_hw`` and
        ``images_per_sample`` may stay on the host (``Task.host_keys``): they are checked and read
        there and only the ids are copied to the device, without waiting (docs/method.md §7). In
        training with gradients, a batch without
        images still runs the dummy image through the ViT and merger (docs/method.md §6).
        """
        input_ids = input_ids.reshape(-1)  # checked where it is (the host: no read-back), then moved
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

    # ------------------------------------------------------------------ generation
    @torch.no_grad()
    def generate(
        self,
        images: Sequence[Any] | None = None,
        prompt: str = "",
        *,
        processor: ImageProcessor | None = None,
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
        processor: ImageProcessor | None = None,
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
        head_only = self._head_only_ids()
        return {
            "vision": list(self.vit.parameters()),
            "merger": list(self.merger.parameters()),
            "llm": [p for p in self.llm.parameters() if id(p) not in head_only],
            "lm_head": [p for p in self.lm_head.parameters() if id(p) in head_only],
        }

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
        enable_hf_checkpointing(self.llm)

    # ------------------------------------------------------------------ I/O (cmpt.vlm.io)
    save_pretrained = save_vlm
    from_pretrained = classmethod(load_vlm)

    def export_vit(self, directory: str | Path) -> Path:
        """Write the ViT alone as a NativeViT directory (CoMP-VFM, ``NativeViT.from_pretrained``), with
        the VLM's image processor as its ``preprocessor_config.json``."""
        self.vit.save_pretrained(directory, processor=self.processor)
        return Path(directory)
