"""MoCa stage 2's objective: heterogeneous contrastive learning over a backbone (docs/method.md §3
"Stage 2").

A micro-batch of B pairs (:func:`cmpt.data.pairs.collate_pairs`) holds ``B`` queries, ``B``
positives and ``B·k`` hard negatives packed in one text row. They are embedded together —
bidirectional attention, mean of the final-normed hidden states per input, L2-normalized — and:

* in-batch negatives: the positives of **all ranks**, gathered with an autograd-aware all-gather, so
  every rank's targets receive the gradient of every rank's queries; with the trainer's global
  normalization (sum over local queries × world size / global count) N ranks × B pairs give
  exactly the gradient of 1 rank × N·B pairs (the release gathers without gradient and does not
  rescale: its gradient is 1/N of the full-batch one, docs/method.md §8);
* hard negatives: each query's own ``k``, scored against that query only;
* GradCache (``loss.grad_cache_chunk`` > 0 inputs per chunk): inputs are embedded chunk by chunk
  under activation checkpointing, so only the embeddings are kept; the backward re-runs one chunk
  at a time with the gradients of its embeddings, and a batch may exceed one device's memory while
  the loss and gradients stay those of the whole batch.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from cmpt.host_tensor import to_device_async
from cmpt.losses import info_nce, segment_mean
from cmpt.train.distributed import all_gather_with_grad

__all__ = ["ContrastiveObjective"]


class ContrastiveObjective(nn.Module):
    """``{"cl_sum", "cl_count"}``: InfoNCE summed over this rank's queries, and their number.

    A batch may repeat pairs to keep its shape (``pair_mask`` False on the copies, see
    :func:`cmpt.data.pairs.collate_pairs`): copies are neither queries of the loss nor in-batch
    negatives of the others.

    ``loss``: the recipe's ``MocaLossConfig`` (``temperature``, ``grad_cache_chunk``).
    """

    def __init__(self, backbone: nn.Module, loss: Any) -> None:
        super().__init__()
        self.backbone, self.loss = backbone, loss

    def parts(self) -> dict[str, list[nn.Parameter]]:
        return {}

    def _embed(self, ids: torch.Tensor, cu: torch.Tensor, images: dict[str, Any]) -> torch.Tensor:
        out = self.backbone(ids, cu, attention="bidirectional", **images)
        return F.normalize(segment_mean(out.hidden, list(out.layout.lengths)), dim=-1)

    def embed(self, batch: dict[str, Any]) -> torch.Tensor:
        """L2-normalized embeddings ``(S, D)`` of the batch's packed inputs, in order."""
        cu = [int(x) for x in batch["cu_seqlens"].tolist()]
        chunk = int(self.loss.grad_cache_chunk)
        if chunk <= 0 or chunk >= len(cu) - 1:
            return self._embed(batch["input_ids"], batch["cu_seqlens"], self._images(batch, 0, len(cu) - 1))
        parts = []
        for s in range(0, len(cu) - 1, chunk):
            e = min(s + chunk, len(cu) - 1)
            ids = batch["input_ids"].reshape(-1)[cu[s] : cu[e]]
            sub_cu = torch.tensor(cu[s : e + 1]) - cu[s]
            images = self._images(batch, s, e)
            if torch.is_grad_enabled():
                parts.append(checkpoint(self._embed, ids, sub_cu, images, use_reentrant=False))
            else:
                parts.append(self._embed(ids, sub_cu, images))
        return torch.cat(parts)

    @staticmethod
    def _images(batch: dict[str, Any], start: int, end: int) -> dict[str, Any]:
        """Patches, grids and per-input counts of inputs ``start … end − 1``."""
        per_input = batch.get("images_per_sample")
        grid_hw = batch.get("grid_hw")
        if per_input is None or grid_hw is None or grid_hw.shape[0] == 0:
            return {}
        counts = [int(x) for x in per_input.tolist()]
        first, last = sum(counts[:start]), sum(counts[:end])
        rows = [int(h) * int(w) for h, w in grid_hw.tolist()]
        r0, r1 = sum(rows[:first]), sum(rows[:last])
        if last == first:
            return {"images_per_sample": per_input[start:end]}
        return {
            "patches": batch["patches"][r0:r1],
            "grid_hw": grid_hw[first:last],
            "images_per_sample": per_input[start:end],
        }

    def forward(self, batch: dict[str, Any]) -> dict[str, Any]:
        b, k = int(batch["num_pairs"]), int(batch["num_hard_negatives"])
        emb = self.embed(batch)
        query, positive = emb[:b], emb[b : 2 * b]
        negatives = emb[2 * b :].reshape(b, k, -1) if k else None
        real = batch.get("pair_mask")  # on the host with MocaTask.host_keys: read there
        real = torch.ones(b, dtype=torch.bool) if real is None else real.to(torch.bool).cpu()
        targets, offset = all_gather_with_grad(positive)
        valid_targets, _ = all_gather_with_grad(to_device_async(real, emb.device).to(emb.dtype))
        rows = to_device_async(real.nonzero().flatten(), emb.device)
        hard_mask = to_device_async(batch["neg_mask"], emb.device).index_select(0, rows) if k else None
        total = info_nce(
            query.index_select(0, rows),
            targets,
            negatives.index_select(0, rows) if negatives is not None else None,
            self.loss.temperature,
            positives=rows + offset,
            hard_negative_mask=hard_mask,
            target_mask=valid_targets > 0.5,
            reduction="sum",
        )
        return {"cl_sum": total, "cl_count": int(real.sum())}
