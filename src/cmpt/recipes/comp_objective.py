"""CoMP's objective over a :class:`~cmpt.vlm.model.VisionLanguageModel`: ``L = L_dec + λ·L_align``
(docs/method.md §2).

:class:`CompObjective` is the module the trainer wraps (DDP / FSDP2): its forward runs the pure
VLM once, then the next-token loss (logits only at supervised positions) and the alignment loss
(the caption alone through the LLM body without gradient, packed like the LM pass). It returns
*un-normalized* sums and their counts, so that the trainer normalizes by global counts across
ranks and micro-batches (docs/method.md §6 "Loss normalization").
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from cmpt.host_tensor import host_tensor
from cmpt.losses import alignment_loss, log_prior_from_counts, next_token_loss, segment_mean, shift_labels
from cmpt.losses.fused_ce import check_lm_impl
from cmpt.vlm.model import VisionLanguageModel

__all__ = ["CompObjective"]


class CompObjective(nn.Module):
    """Loss sums of one collated micro-batch (:func:`cmpt.data.pipeline.collate`):
    ``{"lm_sum", "lm_count", "align_sum", "align_count"}``.

    ``loss``: the recipe's ``LossConfig`` (``align``, ``align_weight``, Sinkhorn settings,
    ``lm_chunk_size``, ``lm_impl``: checked here, at start). ``vocab_counts`` ``(V_tok,)``: token
    counts of the prior (zero-padded to the LM-head rows); None = uniform prior. ``align_count`` =
    samples with ≥ 1 image and a caption.
    """

    def __init__(self, vlm: VisionLanguageModel, loss: Any, vocab_counts: torch.Tensor | None = None) -> None:
        super().__init__()
        check_lm_impl(loss.lm_impl)
        self.vlm, self.loss = vlm, loss
        self.align = bool(loss.align and loss.align_weight > 0)
        rows = vlm.lm_head.weight.shape[0]
        if vocab_counts is not None and vocab_counts.shape[0] > rows:
            raise ValueError(
                f"vocab_counts has {vocab_counts.shape[0]} entries but the LM head only {rows} rows"
            )
        if vocab_counts is not None and vocab_counts.shape[0] < rows:  # tokens added after counting
            vocab_counts = torch.cat([vocab_counts, vocab_counts.new_zeros(rows - vocab_counts.shape[0])])
        self.vocab_counts = vocab_counts
        # log π, computed once (docs/method.md §2) and kept per device: no per-micro-batch copy of
        # the counts, no recomputation of the prior
        prior_temp = loss.prior_temp
        self._log_prior = None if vocab_counts is None else log_prior_from_counts(vocab_counts, prior_temp)
        self._log_prior_on: dict[torch.device, torch.Tensor] = {}

    def forward(self, batch: dict[str, Any]) -> dict[str, Any]:
        vlm = self.vlm
        out = vlm(
            batch["input_ids"],
            batch["cu_seqlens"],
            patches=batch.get("patches"),
            grid_hw=batch.get("grid_hw"),
            images_per_sample=batch.get("images_per_sample"),
            sample_ids=batch.get("sample_ids"),
        )
        head = vlm.lm_head
        targets = shift_labels(batch["labels"].reshape(-1), out.layout.lengths)  # where the labels are
        lm_sum, lm_count = next_token_loss(
            out.hidden,
            targets,
            head.weight,
            head.bias,
            chunk_size=self.loss.lm_chunk_size,
            shift=False,
            impl=self.loss.lm_impl,
        )
        align_sum, align_count = (
            self._align(batch, out.vision, out.vision_per_sample) if self.align else (None, 0)
        )
        if align_sum is None:  # a zero connected to the graph (DDP/FSDP see the same parameters)
            align_sum = (out.vision.sum() if out.vision is not None else lm_sum) * 0.0
        return {"lm_sum": lm_sum, "lm_count": lm_count, "align_sum": align_sum, "align_count": align_count}

    def _align(
        self, batch: dict[str, Any], vision: torch.Tensor | None, per_sample: list[int] | None
    ) -> tuple[torch.Tensor | None, int]:
        """``L_align · count`` over the samples with an image and a caption, or (None, 0)."""
        if "caption_ids" not in batch or "caption_cu_seqlens" not in batch:
            raise ValueError("the alignment loss needs caption_ids and caption_cu_seqlens in the batch")
        if vision is None:
            return None, 0
        if per_sample is None:
            raise ValueError(
                "the alignment loss needs images_per_sample in the batch (images of each sample)"
            )
        cu = [int(x) for x in batch["caption_cu_seqlens"].tolist()]
        keep = [i for i, n in enumerate(per_sample) if n > 0 and cu[i + 1] > cu[i]]
        if not keep:
            return None, 0
        captions = batch["caption_ids"].reshape(-1)
        ids = torch.cat([captions[cu[i] : cu[i + 1]] for i in keep])
        kept_cu = [0]
        for i in keep:
            kept_cu.append(kept_cu[-1] + cu[i + 1] - cu[i])
        text_feats = self.vlm.text_features(ids, kept_cu)
        vision_feats = segment_mean(vision, per_sample).index_select(0, host_tensor(keep, vision.device))
        log_prior = None
        if self._log_prior is not None:
            if vision.device not in self._log_prior_on:
                self._log_prior_on[vision.device] = self._log_prior.to(vision.device)
            log_prior = self._log_prior_on[vision.device]
        c = self.loss
        loss = alignment_loss(
            vision_feats,
            text_feats,
            self.vlm.lm_head.weight,
            vision_temp=c.vision_temp,
            sinkhorn_eps=c.sinkhorn_eps,
            iters=c.sinkhorn_iters,
            variant=c.sinkhorn_variant,
            log_prior=log_prior,
        )
        return loss * len(keep), len(keep)
