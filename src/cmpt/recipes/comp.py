"""The CoMP recipe: one stage of continual multimodal pre-training as data (docs/method.md §2, §2.1).

A stage says which parts train (``vision``, ``merger``, ``llm``, ``lm_head``), their learning
rates, RoPE on/off, the resolution policy, the loss weights and the token budgets. It starts from
the previous stage's output directory (``model.init``) or, for stage I, from a vision checkpoint
and a language model (``model.vision`` + ``model.llm``). Loss: ``L = L_dec + λ·L_align``.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from ..data.config import DataConfig, ResolutionConfig
from ..paths import expand_path
from ..train.config import OptimConfig, RunConfig, TrainConfig
from ..train.distributed import loads_weights, trains_in_bf16, world_info
from ..train.loop import LossTerms
from ..train.task import Loader
from ..vision.attention import check_backend
from ..vlm.model import VisionLanguageModel
from .comp_objective import CompObjective

log = logging.getLogger("cmpt.recipes.comp")
PARTS = ("vision", "merger", "llm", "lm_head")


@dataclass
class ModelConfig:
    """Where the stage starts. ``init``: a VLM directory (previous stage's ``final/``); else
    ``vision`` (NativeViT dir, HF vision checkpoint or a CoMP-VFM tower of the release) + ``llm``
    (HF causal LM) build a fresh VLM.
    ``pos_embed_order``: the tower's position-table order (docs/method.md §1.1, §1.5); unset keeps
    the starting checkpoint's (``official`` for a converted release checkpoint, ``window`` for a
    fresh HF tower and cmpt's own outputs); :class:`CompTask` records the order it resolved to in
    the run's config, so a resume compares the order actually trained."""

    init: str = ""
    vision: str = ""
    llm: str = ""
    keep_prefix_tokens: bool = False  # official CoMP drops CLS/registers from the packed stream
    pos_embed_order: Literal["window", "official"] | None = None
    attn: Literal["auto", "sdpa", "flex", "flash", "varlen"] = "auto"


@dataclass
class StageConfig:
    """method.md §2.1: trainable parts, per-part LRs (others use ``optim.lr``), RoPE, resolution."""

    name: str = "stage1"
    trainable: list[str] = field(default_factory=lambda: ["merger"])
    lr: dict[str, float] = field(default_factory=dict)
    rope: bool = False
    resolution: ResolutionConfig = field(default_factory=ResolutionConfig)

    def __post_init__(self) -> None:
        bad = [p for p in [*self.trainable, *self.lr] if p not in PARTS]
        if bad or not self.trainable:
            raise ValueError(
                f"stage parts must be a non-empty subset of {PARTS}, got {bad or self.trainable}"
            )


@dataclass
class LossConfig:
    """``L = L_dec + align_weight·L_align`` (λ = 0.05); alignment settings of docs/method.md §2."""

    align: bool = True
    align_weight: float = 0.05
    vocab_prior: str = ""  # `cmpt data vocab-prior` output; "" = uniform prior
    sinkhorn_variant: Literal["official", "balanced"] = "official"
    vision_temp: float = 0.005
    sinkhorn_eps: float = 0.005
    prior_temp: float = 0.05
    sinkhorn_iters: int = 3
    lm_chunk_size: int = 4096  # rows of LM-head logits built at once (docs/method.md §6 "LM-head memory")
    lm_impl: Literal["auto", "chunked", "liger"] = "auto"  # LM-head CE (cmpt.losses.fused_ce)


@dataclass
class CompConfig:
    """A whole CoMP stage recipe (``configs/comp/*/stage*.yaml``, ``configs/tiny/comp_stage*.yaml``)."""

    recipe: Literal["comp"] = "comp"
    run: RunConfig = field(default_factory=RunConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    stage: StageConfig = field(default_factory=StageConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    data: DataConfig = field(default_factory=DataConfig)


def load_model(cfg: CompConfig) -> VisionLanguageModel:
    """The stage's starting VLM, with the stage's RoPE switch, processor and text packing. On FSDP2
    ranks > 0 it is a skeleton on the meta device, no weight file read
    (:func:`cmpt.train.distributed.loads_weights`). A ``model.attn`` the training device and
    precision cannot run is refused first, before anything is read
    (:func:`cmpt.vision.attention.check_backend`, docs/method.md §1.1)."""
    m, s = cfg.model, cfg.stage
    device = world_info().device
    check_backend(m.attn, device.type, key="model.attn", half=trains_in_bf16(cfg.train.precision, device))
    weights = loads_weights(cfg.train.dist)
    if m.init:
        init = expand_path(m.init)
        if not (Path(init) / "vlm_config.json").is_file():
            raise FileNotFoundError(
                f"model.init={init} is not a VLM directory; point it at the previous stage's run.dir/final "
                "(run that stage first)"
            )
        vlm = VisionLanguageModel.from_pretrained(init, rope=s.rope, weights=weights)
    elif m.vision and m.llm:
        vlm = VisionLanguageModel.build(
            expand_path(m.vision),
            expand_path(m.llm),
            rope=s.rope,
            keep_prefix_tokens=m.keep_prefix_tokens,
            weights=weights,
        )
    else:
        raise ValueError("set model.init (a previous stage's final/) or both model.vision and model.llm")
    vit_cfg = vlm.vit.config
    vit_cfg.attn = m.attn
    if m.pos_embed_order is not None:
        vit_cfg.pos_embed_order = m.pos_embed_order
    vlm.processor = s.resolution.make_processor(
        vit_cfg.patch_size, vit_cfg.merge_size, mean=vit_cfg.image_mean, std=vit_cfg.image_std
    )
    vlm.configure_packing(cfg.data.packing)
    return vlm


class CompTask:
    """:class:`cmpt.train.loop.Task` for a CoMP stage; the trainer never sees anything CoMP-specific."""

    #: keys whose changes keep the mathematics: the attention kernel, how the LM loss is computed
    #: (chunked or fused, :mod:`cmpt.losses.fused_ce`), where the length index is cached
    resume_ignored_keys = ("model.attn", "loss.lm_chunk_size", "loss.lm_impl", "data.length_cache")
    #: batch keys left on the host (``Task.host_keys``): the model and objective read them in
    #: Python or index by them, and copy to the device what it computes on (docs/method.md §7)
    host_keys = frozenset(
        {"input_ids", "labels", "cu_seqlens", "grid_hw", "images_per_sample"}
        | {"caption_ids", "caption_cu_seqlens"}
    )

    def __init__(self, cfg: CompConfig) -> None:
        self.cfg = cfg
        self.vlm = load_model(cfg)
        cfg.model.pos_embed_order = self.vlm.vit.config.pos_embed_order  # the effective order (resume)
        self.vlm.set_trainable(cfg.stage.trainable)
        for p in self.vlm.vit.unused_parameters():  # e.g. CLS when prefix tokens are dropped
            p.requires_grad_(False)
        self.model = CompObjective(self.vlm, cfg.loss, self._vocab_counts()).train()
        self.align = self.model.align

    def _vocab_counts(self) -> torch.Tensor | None:
        path = self.cfg.loss.vocab_prior
        if not path:
            if self.cfg.loss.align:
                log.warning(
                    "loss.vocab_prior is empty: the alignment loss uses a uniform prior over the "
                    "vocabulary, not the caption-token prior of the paper (docs/method.md §2); build "
                    "one with `cmpt data vocab-prior DATA --tokenizer LLM --out FILE` and set "
                    "loss.vocab_prior=FILE"
                )
            return None
        from ..data.vocab_prior import load_vocab_counts

        return load_vocab_counts(expand_path(path), expected_vocab_size=self.vlm.lm_head.weight.shape[0])

    def param_groups(self) -> list[dict[str, Any]]:
        lrs = self.cfg.stage.lr
        parts = {name: [p for p in params if p.requires_grad] for name, params in self.vlm.parts().items()}
        return [
            {"name": part, "params": parts[part], "lr": lrs.get(part, self.cfg.optim.lr)}
            for part in self.cfg.stage.trainable
            if parts[part]
        ]

    def fsdp_units(self) -> list[nn.Module]:
        return self.vlm.fsdp_units()

    def build_loader(self, rank: int, world_size: int) -> Loader:
        from ..data.length_cache import length_cache_dir
        from ..data.loader import build_loader

        data = dataclasses.replace(self.cfg.data, path=expand_path(self.cfg.data.path))
        cache = length_cache_dir(self.cfg.data.length_cache)  # shared by stages (docs/method.md §4)
        return build_loader(
            data,
            self.vlm.processor,
            self.vlm.tokenizer,
            rank=rank,
            world_size=world_size,
            cache_dir=cache,
        )

    def loss_counts(self, batch: dict) -> dict[str, int]:
        return {"lm": int(batch["num_loss_tokens"]), "align": int(batch["num_align"]) if self.align else 0}

    def compute_loss(self, model: nn.Module, batch: dict) -> LossTerms:
        out = model(batch)
        return LossTerms(
            sums={"lm": out["lm_sum"], "align": out["align_sum"]},
            counts={"lm": out["lm_count"], "align": out["align_count"] if self.align else 0},
            weights={"lm": 1.0, "align": self.cfg.loss.align_weight},
        )

    def save_final(self, model: nn.Module, out_dir: Path) -> None:
        """The stage's output: a VLM directory (the next stage's ``model.init``) plus ``vit/`` (CoMP-VFM).
        Under FSDP2 the trainer has put the gathered full weights into this very module
        (:mod:`cmpt.train.final_weights`): nothing is rebuilt."""
        self.vlm.save_pretrained(out_dir)
        self.vlm.export_vit(Path(out_dir) / "vit")
