"""The CoMP release's CoMP-MM checkpoints → :class:`VisionLanguageModel`; ``cmpt convert official``
(docs/method.md §1.5).

The release's VLM (``SliMMForConditionalGeneration`` in SliMM-X/CoMP-MM ``slimm/model/slimm.py``) is
saved by transformers' ``Trainer``: ``config.json`` is the LLM's Qwen2 config plus the release's fields
(``custom_visual_model`` naming the tower's own checkpoint, ``use_rope``, ``use_mrope`` and an M-RoPE
``rope_scaling``, the vision token ids), the tokenizer and a Qwen2-VL ``preprocessor_config.json``
sit next to it, and the weights are

* ``model.*`` — the Qwen2 decoder, under the names of transformers' ``Qwen2ForCausalLM``;
  ``lm_head.weight`` (absent when tied to the embeddings, as in Qwen2.5-0.5B);
* ``visual.<tower>`` — the CoMP tower of :mod:`cmpt.vision.official_release`;
* ``visual.merger.{ln_q, mlp.0, mlp.2}`` — the PatchMerger (LayerNorm, Linear, GELU, Linear).

The tower's architecture is not in the VLM's ``config.json``: it is read from ``vision_config``
(argument or field), else from the directory or the local Hugging Face cache of
``custom_visual_model``. The LLM runs with its 1-D positions (the release's M-RoPE, §8 #7, gives the
same positions to text-only input).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from cmpt.hub import download_command, is_hub_id, local_model_dir
from cmpt.vision.convert import image_stats
from cmpt.vision.official_release import (
    TOWER_PREFIX,
    build_tower,
    detect_official_layout,
    hf_tower_config,
    load_official_vit,
    read_config,
    read_keys,
    read_state,
    release_settings,
    tower_family,
)

if TYPE_CHECKING:
    from cmpt.vlm.model import VisionLanguageModel

#: The release's merger sub-modules → :class:`cmpt.vlm.merger.PatchMerger`'s.
MERGER_NAMES = {"ln_q": "norm", "mlp.0": "fc1", "mlp.2": "fc2"}
#: The release's ids for the vision tokens (config.json) and cmpt's VLMConfig fields.
TOKEN_FIELDS = {
    "image_token_id": "image_pad_id",
    "vision_start_token_id": "vision_start_id",
    "vision_end_token_id": "vision_end_id",
}


def _tower_config(path: Path, raw: dict[str, Any], vision_config: str | Path | None) -> tuple[dict, str]:
    """The tower's ``config.json`` (as a dict) and where it was found."""
    if vision_config is not None:
        return read_config(vision_config), str(vision_config)
    if isinstance(raw.get("vision_config"), dict):
        return raw["vision_config"], f"{path / 'config.json'} (vision_config)"
    name = raw.get("custom_visual_model")
    if not name:
        raise ValueError(
            f"{path / 'config.json'} names no vision tower (neither vision_config nor custom_visual_model); "
            "pass the tower's config with --vision-config DIR (Python: vision_config=DIR)"
        )
    if (Path(name) / "config.json").is_file():
        return read_config(name), name
    if is_hub_id(name):
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(name, "config.json")
        if isinstance(cached, str):
            return read_config(cached), cached
    raise FileNotFoundError(
        f"{path / 'config.json'}: its vision tower {name!r} (custom_visual_model) has no config.json here "
        f"and none is in the Hugging Face cache; download it (`{download_command(name)} config.json`) "
        "or pass its directory with --vision-config DIR (Python: vision_config=DIR)"
    )


def _llm_config(raw: dict[str, Any], vocab_rows: int, source: str):
    """transformers' ``Qwen2Config`` of the release's LLM: its own fields kept, the release's dropped,
    the M-RoPE ``mrope_section`` removed (1-D positions; ``rope_theta`` kept)."""
    from transformers import Qwen2Config

    if raw.get("model_type") not in ("qwen2", "qwen2_vl"):
        raise ValueError(
            f"{source}: model_type {raw.get('model_type')!r}; the CoMP-MM release's LLM is a Qwen2 "
            "(config.json model_type 'qwen2' or 'qwen2_vl')"
        )
    own = set(Qwen2Config().to_dict()) - {"architectures", "model_type", "_name_or_path", "dtype"}
    kept = {k: v for k, v in raw.items() if k in own or k == "rope_theta"}
    scaling = {k: v for k, v in (raw.get("rope_scaling") or {}).items() if k != "mrope_section"}
    if scaling.get("rope_type", scaling.get("type", "default")) != "default":
        kept["rope_scaling"] = scaling
    return Qwen2Config(**{**kept, "vocab_size": vocab_rows, "architectures": ["Qwen2ForCausalLM"]})


def _load_llm(
    path: Path, raw: dict[str, Any], state: dict[str, torch.Tensor], weights: bool = True, **kwargs: Any
):
    """The release's Qwen2 LLM from its ``model.*`` / ``lm_head.*`` weights (``state``); ``kwargs``
    go to ``from_pretrained`` (``dtype``, ``attn_implementation``, ...). ``weights=False``: a
    meta-device skeleton from the config (``state`` gives only the vocabulary's size)."""
    from transformers import Qwen2ForCausalLM

    config = _llm_config(raw, state["model.embed_tokens.weight"].shape[0], str(path / "config.json"))
    if not weights:
        attn = kwargs.pop("attn_implementation", None)
        with torch.device("meta"):
            return Qwen2ForCausalLM._from_config(config, attn_implementation=attn, **kwargs)
    llm, info = Qwen2ForCausalLM.from_pretrained(
        None, config=config, state_dict=state, output_loading_info=True, **kwargs
    )
    bad = {k: sorted(info[k])[:3] for k in ("missing_keys", "unexpected_keys", "mismatched_keys") if info[k]}
    if bad:
        raise ValueError(f"{path}: the LLM weights do not fit its config.json ({bad})")
    return llm


def _merger_state(state: dict[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    out, unknown = {}, []
    for key, t in state.items():
        module, _, leaf = key.rpartition(".")
        if module in MERGER_NAMES:
            out[f"{MERGER_NAMES[module]}.{leaf}"] = t.float()
        else:
            unknown.append(key)
    if unknown:
        raise ValueError(
            f"{source}: merger weights {sorted(unknown)[:3]} are not the release's PatchMerger "
            "(DeepStack variants are not CoMP-MM checkpoints)"
        )
    return out


def load_official_vlm(
    path: str | Path,
    *,
    vision_config: str | Path | None = None,
    dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
    llm_kwargs: dict[str, Any] | None = None,
    weights: bool = True,
    **vit_overrides: Any,
) -> VisionLanguageModel:
    """Load a CoMP-MM directory of the release as a :class:`VisionLanguageModel` (eval mode;
    docs/method.md §1.5): the tower with ``pos_embed_order: official`` and RoPE as ``use_rope``
    says, the release's merger, the Qwen2 LLM (``dtype``, default float32), tokenizer and
    processor. ``vision_config``: the tower's directory or ``config.json`` when the VLM's own
    ``config.json`` cannot name one available offline. ``llm_kwargs``: more ``from_pretrained``
    arguments of the LLM (e.g. ``attn_implementation``). ``vit_overrides``: NativeViT fields (e.g.
    ``rope``; None values are ignored). ``weights=False``: a meta-device skeleton from the configs,
    tokenizer and the weights' headers (FSDP2 ranks > 0, docs/method.md §6)."""
    from transformers import AutoTokenizer

    from cmpt.vision.processor import ImageProcessor
    from cmpt.vlm.model import VisionLanguageModel

    d = Path(path)
    raw = read_config(d)
    keys = read_keys(d)
    family = tower_family(keys, "visual.")
    if family is None:
        raise ValueError(
            f"{d}: no CoMP SigLIP or DINOv2 tower under 'visual.' (the release's Qwen2-VL tower is not a "
            "CoMP-VFM); not a CoMP-MM checkpoint"
        )
    other = sorted(k for k in keys if not k.startswith(("visual.", "model.", "lm_head.")))
    if other:
        raise ValueError(
            f"{d}: weights outside visual./model./lm_head. ({other[:3]}); not a CoMP-MM checkpoint"
        )
    tower_raw, tower_src = _tower_config(d, raw, vision_config)
    state = read_state(d, weights=weights)
    visual = {k[len("visual.") :]: state.pop(k) for k in list(state) if k.startswith("visual.")}
    merger = {k.removeprefix("merger."): v for k, v in visual.items() if k.startswith("merger.")}
    prefix = TOWER_PREFIX[family]
    rest = {k: v for k, v in visual.items() if not k.startswith("merger.")}
    stray = sorted(k for k in rest if not k.startswith(prefix))
    if stray:
        raise ValueError(f"{d}: weights under visual. that are neither tower nor merger: {stray[:3]}")
    tower = {k.removeprefix(prefix): v for k, v in rest.items()}
    given = {k: v for k, v in vit_overrides.items() if v is not None}  # rope=None keeps use_rope
    settings = {**release_settings(raw), **image_stats(d), **given}
    hf_config = hf_tower_config(family, tower_raw, tower_src)
    vit = build_tower(family, hf_config, tower, str(d), weights=weights, **settings)
    llm = _load_llm(d, raw, state, weights, dtype=dtype or torch.float32, **(llm_kwargs or {}))
    tokenizer = AutoTokenizer.from_pretrained(str(d))
    c = vit.config
    processor = (
        ImageProcessor.from_hf(d, patch_size=c.patch_size, merge_size=c.merge_size)
        if (d / "preprocessor_config.json").is_file()
        else None
    )
    vlm = VisionLanguageModel.build(vit, llm, tokenizer, processor=processor, keep_prefix_tokens=False)
    vlm.merger.load_state_dict(_merger_state(merger, str(d)), assign=not weights)
    vlm.config = replace(vlm.config, vision=f"{d} ({tower_src})", llm=str(d))
    clash = {
        theirs: (raw[theirs], getattr(vlm.config, ours))
        for theirs, ours in TOKEN_FIELDS.items()
        if theirs in raw and raw[theirs] != getattr(vlm.config, ours)
    }
    if clash:
        raise ValueError(
            f"{d}: config.json's vision token ids differ from the tokenizer's (config, tokenizer): {clash}"
        )
    return vlm.to(device) if device is not None else vlm


def convert_official(
    src: str | Path,
    out: str | Path,
    *,
    vision_config: str | Path | None = None,
    dtype: torch.dtype | None = None,
) -> tuple[str, Path]:
    """``cmpt convert official SRC OUT``: write a release checkpoint as a cmpt directory — a CoMP-VFM
    as a NativeViT directory, a CoMP-MM as a VLM directory (``NativeViT.from_pretrained`` /
    ``VisionLanguageModel.from_pretrained`` and ``model.init`` read them). ``SRC`` may be a hub id
    (its cached or downloaded snapshot, :func:`cmpt.hub.local_model_dir`). Returns (kind, OUT)."""
    src = local_model_dir(src, "CoMP release checkpoint", must_exist=True)
    kind = detect_official_layout(src)
    if kind == "vit":
        load_official_vit(src).save_pretrained(out)
    elif kind == "vlm":
        load_official_vlm(src, vision_config=vision_config, dtype=dtype).save_pretrained(out)
    else:
        raise ValueError(
            f"{src} is not a checkpoint of the CoMP release (a CoMP-MM VLM with its tower under 'visual.', "
            "or a CoMP-VFM SigLIP / DINOv2 tower); Hugging Face vision checkpoints load with "
            "NativeViT.from_hf"
        )
    return kind, Path(out)
