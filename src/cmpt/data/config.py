"""Typed configuration of the data path: sources, budgets, resolution policy (docs/method.md §1.4, §4).

Plain module-level dataclasses, so :func:`cmpt.config.load_config` can read them from YAML.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from cmpt.data.chat_layout import DEFAULT_CAPTION_PROMPT
from cmpt.vlm.vision_tokens import IMAGE_TOKEN, VISION_TOKENS

if TYPE_CHECKING:
    from cmpt.vision.processor import ImageProcessor

__all__ = ["DataConfig", "ResolutionConfig"]


@dataclass
class DataConfig:
    """One training source and how it is batched (docs/method.md §4).

    ``path`` (the kind is told by :func:`cmpt.data.open.source_kind`): a LLaVA ``.json`` (one list)
    or ``.jsonl`` (one record per line) file; a mixture ``.yaml`` (:mod:`cmpt.data.mixture`); tar
    shards — a ``.tar``, a glob, a brace pattern ``shards-{000000..000009}.tar`` or a directory of
    ``.tar`` files (:mod:`cmpt.data.webdataset`, streamed by :mod:`cmpt.data.streaming`); a Hugging
    Face dataset — a ``save_to_disk`` directory, ``.parquet`` file(s) or a directory of them
    (:mod:`cmpt.data.hf_source`, needs the optional ``datasets`` package), also a dataset repository
    downloaded from the hub, ``PATH#SPLIT`` for a split. Record layouts: LLaVA, the Hugging Face /
    TRL chat layout, image–caption shards, documents, pairs (``docs/data.md``).
    ``image_root``: directory the image paths are relative to; ``""`` = the source's directory
    (a mixture sets it per member).
    ``max_text_tokens``: per-sample cap; longer conversations are truncated by the sample builder.
    ``vision_budget`` / ``text_budget``: merged vision tokens / text tokens per micro-batch; a
    micro-batch is filled until adding the next sample would exceed either one.
    ``oversize``: a sample larger than a budget on its own is ``"skip"``-ped (counted) or let through
    alone (``"truncate"``: its text is truncated to ``max_text_tokens``).
    The bad-sample limit is ``train.max_bad_fraction``, decided over all ranks (docs/method.md §4);
    a config that still sets ``data.max_bad_fraction`` is read as that key, with a warning.
    ``caption_max_tokens`` / ``shuffle_caption``: the caption text of the alignment loss (docs/method.md §2).
    ``caption_prompt``: the user turn after ``"<image>\n"`` of image–caption records (tar ``jpg`` +
    ``txt`` shards as img2dataset writes them, a ``caption`` in their metadata ``json``, JSON or
    dataset records ``{"image", "caption"}``), read by CoMP as one-turn caption conversations
    (the stage-I form, docs/method.md §2.1); default ``"Describe the image concisely."``.
    Tar shards only: ``shuffle_buffer`` samples per stream are shuffled before batching;
    ``num_streams`` streams per rank (``0`` = one per DataLoader worker, at least one; a multiple of
    ``num_workers``) split the shards; the resume state is tied to it and to the world size.
    ``packing``: run a micro-batch's text as one row (padding-free, block-diagonal attention);
    ``None`` = on where the language model supports it, ``false`` = right-padded rows.
    ``follow_symlinks``: let image paths follow symbolic links out of ``image_root`` (default: such
    a path is a ``path_escape`` bad sample; :func:`cmpt.data.sources.set_follow_symlinks`).
    ``length_cache``: where map-style sources' length indexes are cached, shared by stages and
    ranks (:mod:`cmpt.data.length_cache`): ``""`` = ``cache_root()/lengths``, ``"off"``, or a directory.
    """

    path: str = ""
    image_root: str = ""
    max_text_tokens: int = 2048
    vision_budget: int = 4096
    text_budget: int = 8192
    max_samples_per_batch: int = 64
    oversize: Literal["skip", "truncate"] = "skip"
    shuffle: bool = True
    seed: int = 0
    num_workers: int = 0
    _moved_keys = (("max_bad_fraction", "train.max_bad_fraction"),)  # (old key, new): cmpt.config
    caption_max_tokens: int = 256
    shuffle_caption: bool = True
    shuffle_buffer: int = 256
    num_streams: int = 0
    packing: bool | None = None
    length_cache: str = ""
    follow_symlinks: bool = False
    caption_prompt: str = DEFAULT_CAPTION_PROMPT

    def __post_init__(self) -> None:
        for name in ("max_text_tokens", "vision_budget", "text_budget", "max_samples_per_batch"):
            if getattr(self, name) < 1:
                raise ValueError(f"DataConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.oversize not in ("skip", "truncate"):
            raise ValueError(f"DataConfig.oversize must be 'skip' or 'truncate', got {self.oversize!r}")
        if self.num_workers < 0 or self.caption_max_tokens < 0 or self.num_streams < 0:
            raise ValueError("DataConfig.num_workers, num_streams and caption_max_tokens must be >= 0")
        if not isinstance(self.caption_prompt, str) or any(
            t in self.caption_prompt for t in (IMAGE_TOKEN, *VISION_TOKENS)
        ):
            raise ValueError(
                f"DataConfig.caption_prompt must be a string without {IMAGE_TOKEN} or vision tokens (the "
                f"image comes first, on its own line), got {self.caption_prompt!r}"
            )
        if self.shuffle_buffer < 1:
            raise ValueError(f"DataConfig.shuffle_buffer must be >= 1, got {self.shuffle_buffer}")
        if self.num_workers and self.num_streams and self.num_streams % self.num_workers:
            raise ValueError(
                f"DataConfig.num_streams={self.num_streams} must be a multiple of "
                f"num_workers={self.num_workers}"
            )


@dataclass
class ResolutionConfig:
    """Resolution policy of a stage (docs/method.md §1.4).

    ``"native"``: ``smart_resize`` within ``[min_pixels, max_pixels]`` (official cap: 3000 merged
    tokens per image, ``max_pixels = 14·14·4·3000``). ``"fixed"``: the official ``force_resize`` to
    ``fixed_size × fixed_size`` first (stage I: 384, stage II pass 1: 1024), then ``smart_resize``.
    ``resize`` (native policy): ``"single"`` resizes once (default, better quality); ``"official"``
    resizes twice as the release does — qwen-vl-utils' ``fetch_image`` cap first, then
    ``smart_resize`` (docs/method.md §1.4).
    """

    policy: Literal["native", "fixed"] = "native"
    fixed_size: int = 384
    min_pixels: int = 56 * 56
    max_pixels: int = 14 * 14 * 4 * 3000
    resize: Literal["single", "official"] = "single"

    def __post_init__(self) -> None:
        if self.policy not in ("native", "fixed"):
            raise ValueError(f"ResolutionConfig.policy must be 'native' or 'fixed', got {self.policy!r}")
        if self.resize not in ("single", "official"):
            raise ValueError(f"ResolutionConfig.resize must be 'single' or 'official', got {self.resize!r}")
        if self.fixed_size < 1 or not 0 <= self.min_pixels <= self.max_pixels:
            raise ValueError(
                "ResolutionConfig needs fixed_size >= 1 and 0 <= min_pixels <= max_pixels, got "
                f"{self.fixed_size}, {self.min_pixels}, {self.max_pixels}"
            )

    def processor_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of :class:`cmpt.vision.processor.ImageProcessor` for this policy."""
        kw: dict[str, Any] = dict(
            policy=self.policy, min_pixels=self.min_pixels, max_pixels=self.max_pixels, resize=self.resize
        )
        if self.policy == "fixed":
            kw["fixed_size"] = self.fixed_size
        return kw

    def make_processor(self, patch_size: int = 14, merge_size: int = 2, **kwargs: Any) -> ImageProcessor:
        """An ``ImageProcessor`` with this policy (``kwargs``: ``mean``, ``std``, ...)."""
        from cmpt.vision.processor import ImageProcessor

        return ImageProcessor(
            patch_size=patch_size, merge_size=merge_size, **self.processor_kwargs(), **kwargs
        )
