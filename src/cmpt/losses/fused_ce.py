"""Which implementation computes the LM-head cross-entropy, and the fused CUDA one
(docs/method.md §6 "LM-head memory").

``loss.lm_impl`` (CoMP and MoCa recipes) picks how :func:`cmpt.losses.next_token_loss` turns the
hidden states of the supervised rows into a summed cross-entropy; the definition (rows, targets,
sum over supervised tokens, float32 softmax) is the same for all:

* ``chunked`` — cmpt's own: logits in chunks of ``lm_chunk_size`` rows, each recomputed in the
  backward pass. Runs everywhere.
* ``liger`` — Liger-Kernel's fused linear cross-entropy (``liger_kernel.transformers.functional.
  liger_fused_linear_cross_entropy``, Triton): logits chunk by chunk, the gradients of the hidden
  states and the LM head computed in the forward pass, so no logits are kept or recomputed.
  CUDA only; the optional extra ``cmpt[liger]``.
* ``auto`` (default) — ``liger`` when the loss runs on CUDA and liger-kernel imports, else
  ``chunked``. An installed liger-kernel that fails to import (any error: a triton or driver
  mismatch raises more than ``ImportError``) counts as absent; the reason is logged once.

:func:`check_lm_impl` is the start-time check (an unknown name, or ``liger`` where it cannot run,
is a :class:`ValueError` naming the fix); :func:`resolve_lm_impl` decides per call from the device.
"""

from __future__ import annotations

import functools
import importlib.util
import logging

import torch

__all__ = ["LM_IMPLS", "check_lm_impl", "fused_linear_ce_sum", "liger_available", "resolve_lm_impl"]

LM_IMPLS = ("auto", "chunked", "liger")
_INSTALL = "pip install 'cmpt[liger]' (or: pip install liger-kernel)"
_log = logging.getLogger(__name__)


@functools.cache
def _liger_import_error() -> str | None:
    """Why Liger's fused linear CE cannot be imported here, or None when it can (asked once: an
    installed liger-kernel that does not import is logged once, as a warning)."""
    if importlib.util.find_spec("liger_kernel") is None:
        return "liger-kernel is not installed"
    try:
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy  # noqa: F401
    except Exception as e:  # ImportError (no triton), or what triton / a driver raises on import
        why = f"liger-kernel does not import ({type(e).__name__}: {e})"
        _log.warning("%s: loss.lm_impl=auto uses the chunked LM loss", why)
        return why
    return None


def liger_available() -> bool:
    """True when liger-kernel's fused linear cross-entropy imports (it needs triton)."""
    return _liger_import_error() is None


def _check_name(impl: str) -> None:
    if impl not in LM_IMPLS:
        raise ValueError(f"loss.lm_impl must be one of {', '.join(LM_IMPLS)}, got {impl!r}")


def check_lm_impl(impl: str) -> None:
    """Start-time check of ``loss.lm_impl`` (docs/method.md §6 "LM-head memory"): a known name, and
    for ``liger`` liger-kernel importable and a CUDA device present."""
    _check_name(impl)
    if impl != "liger":
        return
    why = _liger_import_error()
    if why is not None:
        raise ValueError(
            f"loss.lm_impl=liger: {why}; install it on a CUDA machine with `{_INSTALL}`, "
            "or set loss.lm_impl=auto (chunked where liger cannot run)"
        )
    if not torch.cuda.is_available():
        raise ValueError(
            "loss.lm_impl=liger runs only on CUDA (Triton kernels) and no CUDA device is available; "
            "set loss.lm_impl=auto or loss.lm_impl=chunked"
        )


def resolve_lm_impl(impl: str, device: torch.device | str) -> str:
    """``"liger"`` or ``"chunked"`` for a loss computed on ``device``: ``auto`` takes liger on CUDA
    when it imports; ``liger`` off CUDA is a :class:`ValueError`."""
    _check_name(impl)
    on_cuda = torch.device(device).type == "cuda"
    if impl == "auto":
        return "liger" if on_cuda and liger_available() else "chunked"
    if impl == "liger":
        if not on_cuda:
            raise ValueError(
                f"loss.lm_impl=liger needs the loss on a CUDA device, got {torch.device(device)}; "
                "set loss.lm_impl=auto or loss.lm_impl=chunked"
            )
        check_lm_impl(impl)
    return impl


def fused_linear_ce_sum(
    hidden: torch.Tensor, targets: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """Summed cross-entropy of ``hidden @ weight.T (+ bias)`` ``(n, V)`` against ``targets`` ``(n,)``
    with Liger's fused kernel (float32 result; logits never kept). Every target must be a valid
    class: :func:`cmpt.losses.next_token_loss` passes only the supervised rows."""
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

    loss = liger_fused_linear_cross_entropy(
        hidden.contiguous(), weight, targets.contiguous(), bias, reduction="sum"
    )
    return loss.float()
