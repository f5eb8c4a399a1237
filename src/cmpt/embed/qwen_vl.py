"""Hugging Face Qwen2-VL / Qwen2.5-VL as a cmpt backbone (docs/method.md §3 "Backbones", §7).

:class:`QwenVLBackbone` wraps ``Qwen2VLForConditionalGeneration`` /
``Qwen2_5_VLForConditionalGeneration`` (transformers' own classes, never ``trust_remote_code``) behind
the interface of :class:`~cmpt.vlm.model.VisionLanguageModel`, so that MoCa's objective and the
embedder use either backbone unchanged::

    patches (P, 3·T·p·p), grid_hw (n, 2) ──model.visual (grid_thw = (1, h, w))──▶ (P / m², H)
    input_ids (N,) cut by cu_seqlens ──input embeddings──▶ (N, H) ◀── merged tokens at <|image_pad|>
    M-RoPE ids (3, rows, T): ``get_rope_index``'s, for the whole micro-batch in one pass (mrope)
    ──text decoder, "causal" | "bidirectional", packed or padded (text_attention)──▶ hidden (N, H)

Decisions:

* **Images.** transformers' ``Qwen2VLProcessor`` needs torchvision for its video part, so images are
  preprocessed by cmpt's :class:`~cmpt.vision.processor.ImageProcessor` configured from the
  checkpoint's ``preprocessor_config.json``; its ``(P, 3·p·p)`` rows (merge-window order, channel
  then ``p×p``) become the model's rows with :meth:`QwenVLBackbone.prepare_patches`: each still
  image is ``temporal_patch_size`` identical frames, laid out ``(channel, frame, p, p)`` as in
  ``Qwen2VLImageProcessor``. :meth:`forward` accepts either width.
* **Positions.** Each sequence gets the M-RoPE ids the model's own ``get_rope_index`` gives it
  alone (:mod:`cmpt.embed.mrope` computes them in one pass; tests compare); a packed row
  concatenates them. Each image must be rendered as ``<|vision_start|>`` followed by its
  ``<|image_pad|>`` tokens (the Qwen chat format).
* **Vision attention** packed, one varlen call per block (:mod:`cmpt.embed.vision_attention`).
* **Dtypes and mode** as for ``VisionLanguageModel``: float32 unless ``dtype`` is given, returned
  in eval mode; the dummy image (docs/method.md §6) runs only in training with gradients.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from cmpt.embed.vision_inputs import precomputed_vision_inputs
from cmpt.host_tensor import to_device_async
from cmpt.hub import read_json
from cmpt.vision.processor import CONFIG_NAME, ImageProcessor
from cmpt.vlm.backbone import BackboneMixin, enable_hf_checkpointing
from cmpt.vlm.chat import IMAGE_PAD, VISION_END, VISION_START
from cmpt.vlm.io import from_pretrained_checked, resize_vocab
from cmpt.vlm.model import VLMOutput
from cmpt.vlm.text_attention import AttentionMode, TextLayout

from .mrope import images_per_sequence, mrope_position_ids
from .vision_attention import set_vision_attention

__all__ = ["MODEL_CLASSES", "QwenVLBackbone", "QwenVLConfig"]

#: ``model_type`` → transformers class.
MODEL_CLASSES = {
    "qwen2_vl": "Qwen2VLForConditionalGeneration",
    "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration",
}


@dataclass(frozen=True)
class QwenVLConfig:
    """Facts of the wrapped checkpoint that cmpt code reads (same names as ``VLMConfig``)."""

    model_type: str
    merge_size: int
    patch_size: int
    temporal_patch_size: int
    image_pad_id: int
    vision_start_id: int
    vision_end_id: int


def _config_of(hf: nn.Module) -> QwenVLConfig:
    c, v = hf.config, hf.config.vision_config
    return QwenVLConfig(
        model_type=str(c.model_type),
        merge_size=int(v.spatial_merge_size),
        patch_size=int(v.patch_size),
        temporal_patch_size=int(v.temporal_patch_size),
        image_pad_id=int(c.image_token_id),
        vision_start_id=int(c.vision_start_token_id),
        vision_end_id=int(c.vision_end_token_id),
    )


class QwenVLBackbone(BackboneMixin, nn.Module):
    """A Hugging Face Qwen2-VL / Qwen2.5-VL with the interface of ``VisionLanguageModel`` (docs/method.md §3).

    Attributes: ``hf`` (the ``*ForConditionalGeneration``), ``tokenizer``, ``processor`` (a cmpt
    ``ImageProcessor``), ``config`` (:class:`QwenVLConfig`), ``packing``. Placeholder checks,
    packing, :meth:`run_layer`, :meth:`text_features` and :meth:`set_trainable` come from
    :class:`~cmpt.vlm.backbone.BackboneMixin`, as for ``VisionLanguageModel``.
    """

    def __init__(
        self,
        hf: nn.Module,
        tokenizer: PreTrainedTokenizerBase,
        processor: ImageProcessor | None = None,
        preprocessor_config: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.hf, self.tokenizer = hf, tokenizer
        self.config = _config_of(hf)
        c = self.config
        self.processor = processor or ImageProcessor(c.patch_size, c.merge_size)
        self._preprocessor_config = dict(preprocessor_config or {})
        if (self.processor.patch_size, self.processor.merge_size) != (c.patch_size, c.merge_size):
            raise ValueError(
                f"image processor patch/merge size {self.processor.patch_size}/{self.processor.merge_size} "
                f"disagree with the model's vision config {c.patch_size}/{c.merge_size}"
            )
        for token, want in (
            (IMAGE_PAD, c.image_pad_id),
            (VISION_START, c.vision_start_id),
            (VISION_END, c.vision_end_id),
        ):
            got = tokenizer.convert_tokens_to_ids(token)
            if got != want:
                raise ValueError(
                    f"the tokenizer maps {token} to {got} but the {c.model_type} config says {want}: "
                    "use the checkpoint's own tokenizer (with its vision tokens)"
                )
        self.configure_packing(None)
        self.set_vision_attention("auto")

    # ------------------------------------------------------------------ I/O
    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        *,
        dtype: torch.dtype | None = None,
        attn_implementation: str | None = None,
        weights: bool = True,
    ) -> QwenVLBackbone:
        """Load a Hugging Face Qwen2-VL / Qwen2.5-VL directory (eval mode): the model through its
        transformers class, the tokenizer through ``AutoTokenizer``, the image processor from its
        ``preprocessor_config.json`` (``ImageProcessor.from_hf``; defaults when absent). A weight file
        with missing or unexpected tensors is refused (:class:`~cmpt.vlm.io.CheckpointWeightsError`).
        ``weights=False`` builds the model from its ``config.json`` on the meta device, reading no
        weight file (FSDP2 ranks > 0, docs/method.md §6 "Distributed training")."""
        import transformers

        d = Path(path)
        cfg_file = d / "config.json"
        if not cfg_file.is_file():
            raise FileNotFoundError(
                f"{d}: no config.json; pass a local Qwen2-VL / Qwen2.5-VL checkpoint directory"
            )
        raw = read_json(cfg_file)
        model_type = raw.get("model_type")
        if model_type not in MODEL_CLASSES:
            raise ValueError(
                f"{d}: architecture {raw.get('architectures')} (model_type {model_type!r}) is not "
                f"supported by QwenVLBackbone, which loads model types {sorted(MODEL_CLASSES)}; a cmpt "
                "VLM directory loads with VisionLanguageModel.from_pretrained"
            )
        kwargs: dict[str, Any] = {"dtype": dtype or torch.float32}
        if attn_implementation:
            kwargs["attn_implementation"] = attn_implementation
        model_cls = getattr(transformers, MODEL_CLASSES[model_type])
        if weights:
            hf = from_pretrained_checked(model_cls, str(d), **kwargs)
        else:
            config = transformers.AutoConfig.from_pretrained(str(d))
            with torch.device("meta"):
                hf = model_cls._from_config(config, **kwargs)
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(d))
        pre = d / CONFIG_NAME
        pre_cfg = read_json(pre) if pre.is_file() else None
        processor = ImageProcessor.from_hf(d) if pre_cfg is not None else None
        return cls(hf, tokenizer, processor, pre_cfg).eval()

    def save_pretrained(self, directory: str | Path) -> Path:
        """Write a Hugging Face directory (model, tokenizer, ``preprocessor_config.json``) that
        :meth:`from_pretrained` (and transformers) reload."""
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        self.hf.save_pretrained(str(out))
        self.tokenizer.save_pretrained(str(out))
        p, c = self.processor, self.config
        pre = {
            "image_processor_type": "Qwen2VLImageProcessor",
            **self._preprocessor_config,
            "do_resize": True,
            "resample": 3,
            "do_rescale": True,
            "rescale_factor": 1 / 255,
            "do_normalize": True,
            "do_convert_rgb": True,
            "image_mean": list(p.mean),
            "image_std": list(p.std),
            "patch_size": c.patch_size,
            "temporal_patch_size": c.temporal_patch_size,
            "merge_size": c.merge_size,
            "min_pixels": p.min_pixels,
            "max_pixels": p.max_pixels,
            "size": {"shortest_edge": p.min_pixels, "longest_edge": p.max_pixels},
        }
        (out / CONFIG_NAME).write_text(json.dumps(pre, indent=2) + "\n")
        return out

    # ------------------------------------------------------------------ pieces
    @property
    def device(self) -> torch.device:
        return self.input_embeddings.weight.device

    @property
    def visual(self) -> nn.Module:
        """The vision tower, patch merger included (``model.visual``)."""
        return self.hf.model.visual

    @property
    def body(self) -> nn.Module:
        """The text decoder (``model.language_model``): returns last hidden states after the norm."""
        return self.hf.model.language_model

    @property
    def lm_head(self) -> nn.Module:
        return self.hf.get_output_embeddings()

    @property
    def input_embeddings(self) -> nn.Module:
        return self.hf.get_input_embeddings()

    @property
    def attention_owner(self) -> nn.Module:
        """The text decoder: its config names the attention implementation of the text side."""
        return self.body

    @property
    def patch_dim(self) -> int:
        """Length of one model patch row, ``3·T·p·p`` (what MoCa's MAE reconstructs, docs/method.md §3)."""
        c = self.config
        return 3 * c.temporal_patch_size * c.patch_size**2

    def prepare_patches(self, patches: torch.Tensor) -> torch.Tensor:
        """``ImageProcessor`` rows ``(P, 3·p·p)`` → the model's rows ``(P, 3·T·p·p)``: each channel's
        ``p×p`` patch repeated for the ``T`` identical frames of a still image, laid out
        ``(channel, frame, p, p)`` as ``Qwen2VLImageProcessor`` does. Rows already ``patch_dim`` wide
        are returned unchanged."""
        p2, t = self.config.patch_size**2, self.config.temporal_patch_size
        if patches.shape[-1] == self.patch_dim:
            return patches
        if patches.dim() != 2 or patches.shape[-1] != 3 * p2:
            raise ValueError(
                f"patches of shape {tuple(patches.shape)}: expected (P, {3 * p2}) processor rows or "
                f"(P, {self.patch_dim}) model rows"
            )
        return patches.reshape(-1, 3, 1, p2).expand(-1, 3, t, p2).reshape(-1, self.patch_dim)

    def set_vision_attention(self, backend: str | None) -> None:
        """The vision tower's attention: cmpt's packed attention with ``backend`` (``auto``, the
        default: one varlen kernel on CUDA) or ``None``, transformers' own (docs/method.md §6 "Vision
        attention of Qwen-VL backbones"; :mod:`cmpt.embed.vision_attention`)."""
        set_vision_attention(self.visual, backend)

    def resize_token_embeddings(self, vocab_size: int) -> None:
        """Grow the input embeddings (and an untied head) to ``vocab_size`` rows (added tokens;
        :func:`cmpt.vlm.io.resize_vocab`)."""
        resize_vocab(self.hf, vocab_size)

    def encode_images(self, patches: torch.Tensor, grid_hw: torch.Tensor) -> torch.Tensor:
        """Packed patches (``(P, 3·T·p·p)`` or processor rows) + grids ``(n, 2)`` → merged vision
        tokens ``(P / m², H)`` from the model's own vision tower."""
        grid_hw = torch.as_tensor(grid_hw, dtype=torch.long).reshape(-1, 2).cpu()  # read on the host
        m = self.config.merge_size
        if bool(((grid_hw % m) != 0).any()):
            raise ValueError(f"image grids {grid_hw.tolist()} must be multiples of merge_size {m}")
        rows = self.prepare_patches(patches)
        if rows.shape[0] != int(grid_hw.prod(-1).sum()):
            raise ValueError(
                f"{rows.shape[0]} patch rows but grids {grid_hw.tolist()} cover {int(grid_hw.prod(-1).sum())}"
            )
        thw = torch.cat([torch.ones_like(grid_hw[:, :1]), grid_hw], dim=1)
        host_built = precomputed_vision_inputs(self.visual, thw, self.device)  # no grid read-back
        dtype = next(self.visual.parameters()).dtype
        pixels = to_device_async(rows, self.device).to(dtype)
        out = self.visual(pixels, grid_thw=to_device_async(thw, self.device), **host_built)
        return out.pooler_output if hasattr(out, "pooler_output") else out

    def _dummy_vision(self) -> torch.Tensor:
        """Merged tokens of an all-zero 2m×2m-patch image (docs/method.md §6)."""
        m = self.config.merge_size
        zeros = torch.zeros(4 * m * m, self.patch_dim, device=self.device)
        return self.encode_images(zeros, torch.tensor([[2 * m, 2 * m]]))

    # ------------------------------------------------------------------ positions
    def text_hidden(
        self,
        embeds: torch.Tensor,
        layout: TextLayout,
        attention: AttentionMode = "causal",
        position_ids: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        """As ``BackboneMixin.text_hidden``; positions default to text-only M-RoPE ids ``(3, rows, T)``."""
        if position_ids is None:
            position_ids = layout.position_ids(embeds.device)[None].expand(3, -1, -1)
        return super().text_hidden(embeds, layout, attention, position_ids)

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
        """Hidden states of a micro-batch (docs/method.md §3, §7), as ``VisionLanguageModel.forward``.

        ``patches``: ``(P, 3·T·p·p)`` model rows or ``(P, 3·p·p)`` processor rows; ``grid_hw``
        ``(n, 2)`` in patches; ``images_per_sample`` ``(B,)`` (inferred from the text when absent).
        The ids and layout tensors may stay on the host, as in ``VisionLanguageModel.forward``; the
        vision tower still reads its grids back (transformers' code, docs/method.md §7).
        ``VLMOutput.body_kwargs["position_ids"]`` holds the M-RoPE ids ``(3, rows, T)``.
        """
        input_ids = input_ids.reshape(-1)  # checked where it is (the host: no read-back), then moved
        layout = TextLayout.from_cu_seqlens(cu_seqlens, self.packing)
        has_images = patches is not None and grid_hw is not None and grid_hw.shape[0] > 0
        if not has_images and images_per_sample is not None and int(images_per_sample.sum()) > 0:
            raise ValueError("images_per_sample counts images but the batch has no patches / grid_hw")
        n_images = int(grid_hw.shape[0]) if has_images else 0
        c = self.config
        counts = images_per_sequence(
            input_ids, layout, n_images, images_per_sample, sample_ids, c.vision_start_id, c.image_pad_id
        )
        vision, per_sample, grids = None, None, None
        if has_images:
            grids = grid_hw.tolist()  # read once: token counts and M-RoPE ids
            per_sample = self._tokens_per_sample(grids, counts)
        self._check_placeholders(input_ids, layout, per_sample or [0] * len(layout.lengths), sample_ids)
        if has_images:
            vision = self.encode_images(patches, grid_hw)
        embeds = self.embed_inputs(input_ids, vision)
        if vision is None and self.training and torch.is_grad_enabled():
            embeds = embeds + 0.0 * self._dummy_vision().sum()  # every vision parameter used (§6)
        ids = to_device_async(input_ids, self.device)
        positions = mrope_position_ids(ids, layout, grids, c.merge_size, c.image_pad_id)
        hidden, kwargs = self.text_hidden(embeds, layout, attention, positions)
        return VLMOutput(hidden, vision, per_sample, layout, kwargs)

    # ------------------------------------------------------------------ recipes
    def parts(self) -> dict[str, list[nn.Parameter]]:
        """Parameters by part (docs/method.md §2.1): ``vision`` (the tower without its merger),
        ``merger`` (``visual.merger``), ``llm`` (text decoder with the input embeddings) and
        ``lm_head``; a tied head's weight is in ``llm`` only. Every parameter is in exactly one part."""
        merger = list(self.visual.merger.parameters())
        merger_ids = {id(p) for p in merger}
        vision = [p for p in self.visual.parameters() if id(p) not in merger_ids]
        vision_ids = merger_ids | {id(p) for p in vision}
        head_only = self._head_only_ids()
        return {
            "vision": vision,
            "merger": merger,
            "llm": [p for p in self.hf.parameters() if id(p) not in vision_ids and id(p) not in head_only],
            "lm_head": [p for p in self.lm_head.parameters() if id(p) in head_only],
        }

    def fsdp_units(self) -> list[nn.Module]:
        """Modules for FSDP2 ``fully_shard``: the vision blocks, then the text decoder layers."""
        return [*self.visual.blocks, *self.body.layers]

    def enable_gradient_checkpointing(self) -> None:
        """Activation checkpointing in the vision blocks and the text decoder layers."""
        enable_hf_checkpointing(self.hf)
