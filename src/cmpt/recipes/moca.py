"""The MoCa recipe as data (docs/method.md §3): stage ``cpt`` (modality-aware continual
pre-training, :class:`~cmpt.recipes.moca_objective.MocaObjective`) and stage ``cl``
(heterogeneous contrastive learning on task-homogeneous batches of pairs,
:class:`~cmpt.recipes.moca_cl_objective.ContrastiveObjective`).

A stage starts from a backbone directory (``model.init``: a cmpt VLM — e.g. the CoMP stage-III
output —, a Hugging Face Qwen2-VL / Qwen2.5-VL checkpoint, or the previous MoCa stage's output) and
runs its LLM with bidirectional attention: ``cpt`` trains ``L = L_MLM + λ·L_MAE`` on text-only,
image–caption and interleaved documents, ``cl`` trains InfoNCE with in-batch and hard negatives.
A stage's output (``final/``) is an Embedder directory: the backbone's own files plus
``embedder_config.json``.
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
from .moca_cl_objective import ContrastiveObjective
from .moca_objective import MocaObjective

log = logging.getLogger("cmpt.recipes.moca")
PARTS = ("vision", "merger", "llm", "lm_head", "mae")


@dataclass
class MocaModelConfig:
    """``init``: the backbone directory. ``llm_attn``: the LLM's ``attn_implementation`` (``""`` =
    transformers' default, sdpa). ``vit_attn``: the packed-attention backend of the vision tower (a
    cmpt ViT, or a Qwen-VL tower through :mod:`cmpt.embed.vision_attention`).
    ``lora_r`` > 0: LoRA (``dora``: DoRA) adapters on the LLM instead of training its weights
    (official CL option: DoRA, r 16, alpha 64, dropout 0.1; needs ``peft``); merged at the end."""

    init: str = ""
    llm_attn: str = ""
    vit_attn: Literal["auto", "sdpa", "flex", "flash", "varlen"] = "auto"
    lora_r: int = 0
    lora_alpha: int = 64
    lora_dropout: float = 0.1
    dora: bool = False


@dataclass
class MocaStageConfig:
    """Trainable parts (MoCa trains everything; ``mae`` = the MAE decoder and head), per-part LRs
    (missing parts use ``optim.lr``) and the resolution policy (official: 256·28² … 1024·28²)."""

    name: Literal["cpt", "cl"] = "cpt"
    trainable: list[str] = field(default_factory=lambda: list(PARTS))
    batch_size: int = 24  # cl: pairs per device per micro-batch (official: 24)
    lr: dict[str, float] = field(default_factory=dict)
    resolution: ResolutionConfig = field(
        default_factory=lambda: ResolutionConfig(min_pixels=256 * 28 * 28, max_pixels=1024 * 28 * 28)
    )

    def __post_init__(self) -> None:
        bad = [p for p in [*self.trainable, *self.lr] if p not in PARTS]
        if bad or not self.trainable:
            raise ValueError(
                f"stage parts must be a non-empty subset of {PARTS}, got {bad or self.trainable}"
            )


@dataclass
class MocaLossConfig:
    """``L = L_MLM + mae_weight·L_MAE`` (docs/method.md §3): masking rates, fill of masked windows
    (``gaussian``: one vector per micro-batch, official; ``learned``), LM-head chunk rows."""

    mlm_prob: float = 0.4
    mae_prob: float = 0.5
    mae_weight: float = 0.1
    mask_fill: Literal["gaussian", "learned"] = "gaussian"
    lm_chunk_size: int = 4096
    lm_impl: Literal["auto", "chunked", "liger"] = "auto"  # LM-head CE (cmpt.losses.fused_ce)
    seed: int = 0
    temperature: float = 0.03  # cl: fixed InfoNCE temperature
    num_hard_negatives: int = 2  # cl: k per query (first k; the last repeated when fewer)
    grad_cache_chunk: int = 0  # cl: > 0 embeds that many inputs at a time (GradCache)

    def __post_init__(self) -> None:
        if not (0.0 <= self.mlm_prob <= 1.0 and 0.0 <= self.mae_prob <= 1.0):
            raise ValueError(
                f"mlm_prob and mae_prob must lie in [0, 1], got {self.mlm_prob}, {self.mae_prob}"
            )


@dataclass
class MocaConfig:
    """A MoCa stage recipe (``configs/tiny/moca_cpt.yaml``, ``configs/moca/*/cpt.yaml``)."""

    recipe: Literal["moca"] = "moca"
    run: RunConfig = field(default_factory=RunConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    model: MocaModelConfig = field(default_factory=MocaModelConfig)
    stage: MocaStageConfig = field(default_factory=MocaStageConfig)
    loss: MocaLossConfig = field(default_factory=MocaLossConfig)
    data: DataConfig = field(default_factory=DataConfig)


def load_backbone_for(cfg: MocaConfig) -> nn.Module:
    """The stage's backbone with ``<|mask|>`` in its vocabulary, the stage's processor and packing.
    ``model.init`` may be a hub id (:func:`cmpt.hub.local_model_dir`: the cached or downloaded
    snapshot; offline and not cached, one line naming the installed CLI's download command). On
    FSDP2 ranks > 0 the backbone is a skeleton on the meta device, no weight file read
    (:func:`cmpt.train.distributed.loads_weights`). A ``model.vit_attn`` the training device cannot
    run is refused first, before anything is read or downloaded
    (:func:`cmpt.vision.attention.check_backend`, docs/method.md §1.1)."""
    from ..embed.backbones import load_backbone
    from ..hub import local_model_dir
    from ..vlm.chat import ensure_mask_token

    device = world_info().device
    half = trains_in_bf16(cfg.train.precision, device)
    check_backend(cfg.model.vit_attn, device.type, key="model.vit_attn", half=half)
    init = str(local_model_dir(expand_path(cfg.model.init), "model.init")) if cfg.model.init else ""
    if not init or not Path(init).is_dir():
        raise FileNotFoundError(
            f"model.init={init or '(unset)'} is not a directory: point it at a cmpt VLM (e.g. the CoMP "
            "stage-III output: `cmpt demo` or `cmpt train tiny/comp_stage1`, then tiny/comp_stage2 and "
            "tiny/comp_stage3) or at a Hugging Face Qwen2-VL / Qwen2.5-VL checkpoint"
        )
    weights = loads_weights(cfg.train.dist)
    backbone = load_backbone(init, attn_implementation=cfg.model.llm_attn or None, weights=weights)
    ensure_mask_token(backbone.tokenizer)
    backbone.resize_token_embeddings(len(backbone.tokenizer))
    if hasattr(backbone, "vit"):
        backbone.vit.config.attn = cfg.model.vit_attn
    else:  # a Hugging Face Qwen-VL tower
        backbone.set_vision_attention(cfg.model.vit_attn)
    p = backbone.processor
    backbone.processor = cfg.stage.resolution.make_processor(
        p.patch_size, p.merge_size, mean=p.mean, std=p.std
    )
    backbone.configure_packing(cfg.data.packing)
    return backbone


#: the release's optimisation per stage (docs/method.md §3 "Hyperparameters"; configs/moca/*/)
RELEASE_OPTIM = {"cpt": "lr 2e-6, warmup 10 %", "cl": "lr 2e-5, warmup 5 %"}


def warn_generic_optim(cfg: MocaConfig) -> None:
    """Warn when a MoCa stage runs on cmpt's generic ``optim`` defaults (lr 1e-4, cosine, no warmup,
    clip 1.0) — a recipe written without ``optim`` and without ``base:`` on a shipped MoCa recipe —
    instead of the release's (docs/method.md §3)."""
    if cfg.optim == OptimConfig():
        log.warning(
            "optim is cmpt's generic default (lr %g, %s schedule, no warmup, clip %g), not MoCa's "
            "(stage %s: %s, linear decay, clip 5.0): set optim, or start the recipe from "
            "`base: moca/qwen2.5-vl-3b/%s.yaml`",
            cfg.optim.lr, cfg.optim.schedule, cfg.optim.clip_grad, cfg.stage.name,
            RELEASE_OPTIM[cfg.stage.name], cfg.stage.name,
        )  # fmt: skip


class MocaTask:
    """:class:`cmpt.train.loop.Task` for a MoCa stage (CPT or CL); the trainer sees nothing MoCa-specific."""

    #: keys whose changes keep the mathematics: attention kernels, how the LM loss is computed,
    #: GradCache's chunking, where the length index is cached
    resume_ignored_keys = (
        "model.llm_attn", "model.vit_attn", "loss.lm_chunk_size", "loss.lm_impl", "loss.grad_cache_chunk",
        "data.length_cache",
    )  # fmt: skip
    #: batch keys left on the host (``Task.host_keys``): the backbone and objectives read them in
    #: Python or index by them, and copy to the device what they compute on (docs/method.md §7)
    host_keys = frozenset(
        {"input_ids", "labels", "cu_seqlens", "grid_hw", "images_per_sample"}
        | {"mae_mask", "pair_mask", "neg_mask"}
    )

    def __init__(self, cfg: MocaConfig) -> None:
        self.cfg = cfg
        warn_generic_optim(cfg)
        self.backbone = load_backbone_for(cfg)
        self.cl = cfg.stage.name == "cl"
        if self.cl:  # a contrastive batch spans the ranks (cmpt.train.reshard, resuming elsewhere)
            self.world_batch_key = "stage.batch_size"
        trainable = [p for p in cfg.stage.trainable if p != "mae"]
        if self.cl and "lm_head" in trainable:  # DDP would fail on its never-used parameters
            trainable.remove("lm_head")
            log.info("stage cl: the contrastive loss never reads the LM head; it stays frozen")
        self.backbone.set_trainable(trainable)
        for p in getattr(getattr(self.backbone, "vit", None), "unused_parameters", list)():
            p.requires_grad_(False)  # e.g. a CLS token the packed stream drops
        objective = ContrastiveObjective if self.cl else MocaObjective
        self.model = objective(self.backbone, cfg.loss).train()
        for p in self.model.parts().get("mae", []):
            p.requires_grad_("mae" in cfg.stage.trainable)
        if cfg.model.lora_r > 0 and "llm" in cfg.stage.trainable:
            self._add_adapters(self.backbone)
        m2 = self.backbone.config.merge_size**2
        self._window_elements = m2 * self.backbone.patch_dim

    def _add_adapters(self, backbone: nn.Module) -> None:
        from ..embed.lora import add_adapters

        m = self.cfg.model
        n = add_adapters(backbone.body, m.lora_r, m.lora_alpha, m.lora_dropout, dora=m.dora)
        log.info("%s adapters on the LLM: %d trainable parameters", "DoRA" if m.dora else "LoRA", n)

    def _parts(self) -> dict[str, list[nn.Parameter]]:
        return {**self.backbone.parts(), **self.model.parts()}

    def param_groups(self) -> list[dict[str, Any]]:
        lrs, parts = self.cfg.stage.lr, self._parts()
        groups = []
        for part in self.cfg.stage.trainable:
            params = [p for p in parts.get(part, []) if p.requires_grad]
            if params:
                groups.append({"name": part, "params": params, "lr": lrs.get(part, self.cfg.optim.lr)})
        return groups

    def fsdp_units(self) -> list[nn.Module]:
        return [*self.backbone.fsdp_units(), *([] if self.cl else [self.model.mae_decoder])]

    def build_loader(self, rank: int, world_size: int) -> Loader:
        """Stage ``cl``: the pair loader; stage ``cpt``: the token-budget loader of documents
        (docs/method.md §3, §4). Data of the other stage's kind (pairs for ``cpt``, documents for
        ``cl``) are refused in one line naming ``data.path`` before anything else is read
        (:func:`cmpt.data.documents.check_data_kind`)."""
        from ..data.documents import DocumentBuilder, check_data_kind
        from ..data.length_cache import length_cache_dir
        from ..data.loader import build_loader
        from ..data.open import open_source

        data = dataclasses.replace(self.cfg.data, path=expand_path(self.cfg.data.path))
        if self.cl:
            from ..data.pairs import build_pair_loader

            return build_pair_loader(
                data,
                self.backbone.processor,
                self.backbone.tokenizer,
                rank=rank,
                world_size=world_size,
                batch_size=self.cfg.stage.batch_size,
                num_hard_negatives=self.cfg.loss.num_hard_negatives,
            )
        check_data_kind(open_source(data.path, data.image_root or None), "documents", data.path)
        builder = DocumentBuilder(
            self.backbone.processor,
            self.backbone.tokenizer,
            max_text_tokens=data.max_text_tokens,
            mlm_prob=self.cfg.loss.mlm_prob,
            mae_prob=self.cfg.loss.mae_prob,
            seed=data.seed,
        )
        cache = length_cache_dir(self.cfg.data.length_cache)  # shared by stages (docs/method.md §4)
        return build_loader(
            data,
            self.backbone.processor,
            self.backbone.tokenizer,
            rank=rank,
            world_size=world_size,
            cache_dir=cache,
            builder=builder,
        )

    def loss_counts(self, batch: dict) -> dict[str, int]:
        if self.cl:
            mask = batch.get("pair_mask")
            return {"cl": int(batch["num_pairs"]) if mask is None else int(mask.sum())}
        return {
            "mlm": int(batch["num_mlm_tokens"]),
            "mae": int(batch["num_mae_windows"]) * self._window_elements,
        }

    def compute_loss(self, model: nn.Module, batch: dict) -> LossTerms:
        out = model(batch)
        if self.cl:
            return LossTerms(sums={"cl": out["cl_sum"]}, counts={"cl": out["cl_count"]}, weights={"cl": 1.0})
        return LossTerms(
            sums={"mlm": out["mlm_sum"], "mae": out["mae_sum"]},
            counts={"mlm": out["mlm_count"], "mae": out["mae_count"]},
            weights={"mlm": 1.0, "mae": self.cfg.loss.mae_weight},
        )

    def save_final(self, model: nn.Module, out_dir: Path) -> None:
        """The stage's output: an Embedder directory (the backbone + ``embedder_config.json``). Under
        FSDP2 the trainer has put the gathered full weights into this very module
        (:mod:`cmpt.train.final_weights`): nothing is rebuilt."""
        from ..embed.embedder import Embedder

        if self.cfg.model.lora_r > 0:
            from ..embed.lora import merge_adapters

            merge_adapters(self.backbone)  # a plain checkpoint: loads without peft, same outputs
        with torch.no_grad():
            Embedder(self.backbone, max_length=self.cfg.data.max_text_tokens).save_pretrained(out_dir)
