"""MoCa stage 1's objective over a backbone: ``L = L_MLM + λ·L_MAE`` in one bidirectional forward
(docs/method.md §3 "Stage 1").

The batch comes from :class:`cmpt.data.documents.DocumentBuilder` with masking on: its text is
already MLM-masked (``input_ids`` with ``<|mask|>``, ``labels`` = the original ids at masked
positions, unshifted) and ``mae_mask`` marks the masked merged windows. Here:

1. the masked windows' patch rows are replaced by one fill vector (a Gaussian drawn per
   micro-batch — seeded by the batch's sample ids, so resume and N ranks = 1 rank stay exact — or a
   learned vector) and the corrupted images still go through the ViT;
2. the backbone runs with bidirectional attention; ``L_MLM`` = cross-entropy at the masked text
   positions, logits only there;
3. the MAE decoder — one decoder layer copied from the LLM's middle layer, bidirectional — runs
   over the whole final-normed hidden sequence with the forward's mask and positions; a Linear
   (N(0, 0.02), zero bias) maps the outputs at the masked windows' image tokens to the windows'
   pixel rows; ``L_MAE`` = mean squared error over their elements.

Sums and counts are returned for the trainer's global normalization (docs/method.md §6).
"""

from __future__ import annotations

import copy
import hashlib
from typing import Any

import torch
from torch import nn

from cmpt.host_tensor import to_device_async
from cmpt.losses import mae_loss, next_token_loss, window_targets
from cmpt.losses.fused_ce import check_lm_impl
from cmpt.vlm.text_attention import set_attention_mode

__all__ = ["MocaObjective"]


def _fill_seed(seed: int, sample_ids: list[str] | None) -> int:
    key = "\x00".join([str(seed), *(sample_ids or [])]).encode()
    return int.from_bytes(hashlib.sha256(key).digest()[:8], "little") & ((1 << 63) - 1)


class MocaObjective(nn.Module):
    """Loss sums of one micro-batch: ``{"mlm_sum", "mlm_count", "mae_sum", "mae_count"}``.

    ``backbone``: a :class:`~cmpt.vlm.model.VisionLanguageModel` or any backbone with its
    interface (``QwenVLBackbone``). ``loss``: the recipe's ``MocaLossConfig`` (``mask_fill``,
    ``lm_chunk_size``, ``lm_impl`` — checked here, at start —, ``seed``).
    """

    def __init__(self, backbone: nn.Module, loss: Any) -> None:
        super().__init__()
        check_lm_impl(loss.lm_impl)
        self.backbone, self.loss = backbone, loss
        layers = backbone.body.layers
        self.mae_decoder = copy.deepcopy(layers[len(layers) // 2])
        for p in self.mae_decoder.parameters():
            p.requires_grad_(True)
        set_attention_mode(self.mae_decoder, "bidirectional")
        hidden = backbone.lm_head.weight.shape[1]
        m2 = backbone.config.merge_size**2
        self.mae_head = nn.Linear(hidden, m2 * backbone.patch_dim)
        nn.init.normal_(self.mae_head.weight, std=0.02)
        nn.init.zeros_(self.mae_head.bias)
        self.mae_head.to(backbone.lm_head.weight.device)
        if loss.mask_fill not in ("gaussian", "learned"):
            raise ValueError(f"loss.mask_fill must be 'gaussian' or 'learned', got {loss.mask_fill!r}")
        self.mask_vector = None
        if loss.mask_fill == "learned":
            self.mask_vector = nn.Parameter(
                0.02 * torch.randn(backbone.patch_dim, device=self.mae_head.weight.device)
            )

    def parts(self) -> dict[str, list[nn.Parameter]]:
        """The objective's own trainable parts (``mae``: decoder layer, head and learned fill)."""
        own = [*self.mae_decoder.parameters(), *self.mae_head.parameters()]
        return {"mae": own + ([self.mask_vector] if self.mask_vector is not None else [])}

    def _fill(self, batch: dict[str, Any], like: torch.Tensor) -> torch.Tensor:
        if self.mask_vector is not None:
            return self.mask_vector.to(like.dtype)
        gen = torch.Generator().manual_seed(_fill_seed(self.loss.seed, batch.get("sample_ids")))
        return to_device_async(torch.randn(like.shape[1], generator=gen), like.device).to(like.dtype)

    def forward(self, batch: dict[str, Any]) -> dict[str, Any]:
        bb = self.backbone
        dev = bb.lm_head.weight.device
        patches, grid_hw = batch.get("patches"), batch.get("grid_hw")
        has_images = patches is not None and grid_hw is not None and grid_hw.shape[0] > 0
        target = corrupted = None
        if has_images:
            patches = bb.prepare_patches(patches.to(dev))
            windows = batch["mae_mask"].to(torch.bool)  # on the host with MocaTask.host_keys
            target = window_targets(patches, windows, bb.config.merge_size)
            rows = to_device_async(windows, dev).repeat_interleave(bb.config.merge_size**2)[:, None]
            corrupted = torch.where(rows, self._fill(batch, patches), patches)
        out = bb(
            batch["input_ids"],
            batch["cu_seqlens"],
            patches=corrupted,
            grid_hw=grid_hw if has_images else None,
            images_per_sample=batch.get("images_per_sample"),
            attention="bidirectional",
            sample_ids=batch.get("sample_ids"),
        )
        head = bb.lm_head
        mlm_sum, mlm_count = next_token_loss(
            out.hidden,
            batch["labels"].reshape(-1),  # where the labels are: the host finds the masked rows
            head.weight,
            head.bias,
            chunk_size=self.loss.lm_chunk_size,
            shift=False,
            impl=self.loss.lm_impl,
        )
        decoded = bb.run_layer(self.mae_decoder, out.hidden, out)
        if target is not None:
            # the masked windows' image-token rows, found where the ids and mask are (the host)
            image_rows = (batch["input_ids"].reshape(-1) == bb.config.image_pad_id).nonzero().flatten()
            masked = image_rows[windows.to(image_rows.device)]
            pred = self.mae_head(decoded.index_select(0, to_device_async(masked, dev)))
            mae_sum, mae_count = mae_loss(pred, target)
        else:  # text-only: keep the decoder, head (and fill) in the graph (DDP/FSDP)
            mae_sum, mae_count = self.mae_head(decoded[:1]).sum() * 0.0, 0
        if self.mask_vector is not None:
            mae_sum = mae_sum + 0.0 * self.mask_vector.sum()
        return {"mlm_sum": mlm_sum, "mlm_count": mlm_count, "mae_sum": mae_sum, "mae_count": mae_count}
