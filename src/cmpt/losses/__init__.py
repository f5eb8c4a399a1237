"""Loss functions of cmpt, as pure functions (docs/method.md §2, §3).

- :func:`alignment_loss` — CoMP ``L_align`` (vision features vs. a Sinkhorn target over the
  vocabulary prototypes), with :func:`sinkhorn_targets`, :func:`prior_from_counts`; the pooling
  helpers :func:`masked_mean` / :func:`segment_mean` (:mod:`cmpt.pooling`) are exported here too.
- :func:`next_token_loss` — ``L_dec`` on supervised positions only (no full-vocab logits), with
  :func:`shift_labels` for packed sequences; with ``shift=False`` MoCa's masked-token loss.
- :func:`mae_loss` / :func:`window_targets` — MoCa's masked-window reconstruction ``L_MAE``.
- :func:`info_nce` — MoCa's contrastive loss (in-batch and hard negatives, fixed temperature).
"""

from cmpt.losses.alignment import (
    SINKHORN_VARIANTS,
    alignment_loss,
    log_prior_from_counts,
    prior_from_counts,
    sinkhorn_targets,
)
from cmpt.losses.contrastive import info_nce
from cmpt.losses.lm import next_token_loss, shift_labels
from cmpt.losses.mae import mae_loss, window_targets
from cmpt.pooling import masked_mean, segment_mean

__all__ = [
    "SINKHORN_VARIANTS",
    "alignment_loss",
    "info_nce",
    "log_prior_from_counts",
    "mae_loss",
    "masked_mean",
    "next_token_loss",
    "prior_from_counts",
    "segment_mean",
    "shift_labels",
    "sinkhorn_targets",
    "window_targets",
]
