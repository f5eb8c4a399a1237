"""LoRA / DoRA adapters on the language model of a backbone, through ``peft`` (optional; docs/method.md
§3 "Stage 2").

:func:`add_adapters` injects low-rank adapters into the body's linear layers in place (the module
tree keeps its names, so the trainer, FSDP units and parts work unchanged) and leaves only the
adapters of the LLM trainable. :func:`merge_adapters` folds them into the base weights and removes
them, so a saved model is a plain checkpoint that loads without ``peft`` — and gives the same
outputs as the adapted model (a merged checkpoint giving different outputs is a known failure of
the anchors, tested here).
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

__all__ = ["DEFAULT_TARGETS", "add_adapters", "merge_adapters"]

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _peft():
    try:
        import peft
    except ImportError:
        raise ImportError(
            "model.lora_r > 0 needs the optional `peft` package: pip install 'cmpt[lora]' "
            "(or set model.lora_r=0 for full fine-tuning)"
        ) from None
    return peft


def add_adapters(
    body: nn.Module,
    r: int,
    alpha: int,
    dropout: float,
    *,
    dora: bool = False,
    targets: Sequence[str] = DEFAULT_TARGETS,
) -> int:
    """Inject rank-``r`` adapters into ``body``'s ``targets`` linears; returns the adapter parameter
    count. The body's own weights are frozen; the adapters train."""
    peft = _peft()
    cfg = peft.LoraConfig(
        r=r, lora_alpha=alpha, lora_dropout=dropout, use_dora=dora, target_modules=list(targets)
    )
    peft.inject_adapter_in_model(cfg, body)
    count = 0
    for name, p in body.named_parameters():
        p.requires_grad_("lora_" in name)
        count += p.numel() if "lora_" in name else 0
    if count == 0:
        raise ValueError(f"no LoRA target among {list(targets)} in {type(body).__name__}")
    return count


def merge_adapters(module: nn.Module) -> int:
    """Fold every adapter under ``module`` into its base layer and put the base layer back in its
    place (in place); returns how many layers were merged."""
    merged = 0
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if hasattr(child, "merge") and hasattr(child, "get_base_layer"):
                child.merge()
                setattr(parent, name, child.get_base_layer())
                merged += 1
    return merged
