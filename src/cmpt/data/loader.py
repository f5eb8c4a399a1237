"""Which loader a data config gets (docs/method.md §4): tar shards stream
(:class:`cmpt.data.streaming.StreamingLoader`); every map-style source (JSON/JSONL, Hugging Face
datasets, mixtures) is indexed by length (:class:`cmpt.data.length_index.LengthIndex`, cached and
shared by ranks) and cut into token-budget micro-batches (:class:`cmpt.data.batching.BatchLoader`).
"""

from __future__ import annotations

import logging
import os
from typing import Any

from cmpt.data.batching import BatchLoader, TokenBudgetBatcher
from cmpt.data.config import DataConfig
from cmpt.data.open import open_source
from cmpt.data.pipeline import LengthIndex, SampleBuilder, length_overhead
from cmpt.data.sources import set_follow_symlinks

__all__ = ["build_loader"]

log = logging.getLogger("cmpt.data")


def build_loader(
    cfg: DataConfig,
    processor: Any,
    tokenizer: Any,
    *,
    rank: int = 0,
    world_size: int = 1,
    cache_dir: str | os.PathLike | None = None,
    builder: Any = None,
) -> Any:
    """Source → length index → batcher → builder → loader, as configured (docs/method.md §4).

    ``cfg.path`` is dispatched by :func:`cmpt.data.open.open_source`: a map-style source (LLaVA
    JSON/JSONL, Hugging Face dataset, mixture) gives a :class:`BatchLoader`; tar shards (or a mixture
    of them) a :class:`cmpt.data.streaming.StreamingLoader`. ``tokenizer`` must already have the
    vision tokens (``ensure_vision_tokens``, then resize the LLM's embeddings). With
    ``oversize="truncate"`` the text estimates are capped at ``max_text_tokens`` (the builder
    truncates to it), so long samples still pack with others; with ``"skip"`` a sample over a budget
    on its own is skipped (``loader.batcher.oversize_skipped`` / ``loader.oversize_skipped``).

    ``builder``: the sample builder (``build(record, epoch)``, ``processor``, ``tokenizer``,
    ``seed``); default a CoMP :class:`~cmpt.data.pipeline.SampleBuilder` from ``cfg``. MoCa passes a
    :class:`cmpt.data.documents.DocumentBuilder` (docs/method.md §3); its ``length_overhead`` (plain
    text) then replaces the chat template's in the length estimates. ``processor`` and
    ``tokenizer`` should be the builder's.

    ``cache_dir``: where the length index is cached (:mod:`cmpt.data.length_cache`; the recipes pass
    ``data.length_cache``); ``None``: not cached. With ``world_size > 1`` under a process group,
    every rank must call this: rank 0 reads or builds the index, the others receive it.
    ``loader.length_index`` tells how long that took and how (``built``, ``cached``, ``received``).
    """
    set_follow_symlinks(cfg.follow_symlinks)
    source = open_source(cfg.path, cfg.image_root or None)
    if builder is None:
        builder = SampleBuilder(
            processor,
            tokenizer,
            max_text_tokens=cfg.max_text_tokens,
            caption_max_tokens=cfg.caption_max_tokens,
            shuffle_caption=cfg.shuffle_caption,
            seed=cfg.seed,
            caption_prompt=cfg.caption_prompt,
        )
    cap = cfg.max_text_tokens if cfg.oversize == "truncate" else None
    budgets = (cfg.text_budget, cfg.vision_budget)  # per micro-batch: the trainer's start-up summary
    if not hasattr(source, "__getitem__"):  # tar shards: streaming
        from cmpt.data.streaming import StreamConfig, StreamingLoader

        scfg = StreamConfig(
            cfg.vision_budget, cfg.text_budget, cfg.max_samples_per_batch, cfg.oversize, cap,
            cfg.shuffle, cfg.shuffle_buffer, cfg.seed,
        )  # fmt: skip
        loader = StreamingLoader(
            source, builder, scfg, rank=rank, world_size=world_size, num_workers=cfg.num_workers,
            num_streams=cfg.num_streams,
        )  # fmt: skip
        loader.token_budgets = budgets
        return loader
    overhead = length_overhead(builder)
    index = LengthIndex.build(  # rank 0 builds or reads it, the other ranks receive it
        source, processor, tokenizer, cache_dir=cache_dir, overhead=overhead, shared=world_size > 1
    )
    lengths = index.lengths
    if cap is not None:
        lengths = [(v, min(t, cap)) for v, t in lengths]
    batcher = TokenBudgetBatcher(
        lengths, cfg.vision_budget, cfg.text_budget, cfg.max_samples_per_batch,
        shuffle=cfg.shuffle, seed=cfg.seed, oversize=cfg.oversize,
    )  # fmt: skip
    if batcher.oversize_skipped:
        log.warning(
            "%s: %d sample(s) over a budget on their own are skipped", cfg.path, batcher.oversize_skipped
        )
    loader = BatchLoader(
        source, builder, batcher, rank=rank, world_size=world_size, num_workers=cfg.num_workers,
    )  # fmt: skip
    loader.length_index = {
        "seconds": index.seconds, "how": index.how, "records": len(index), "unreadable": index.num_failed,
    }  # fmt: skip
    loader.token_budgets = budgets
    return loader
