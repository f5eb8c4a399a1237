"""The CoMP release's own vision towers (CoMP-VFM) → :class:`NativeViT` (docs/method.md §1.5).

The release (github SliMM-X/CoMP-MM, ``slimm/model/vision_encoder/comp_siglip.py`` and
``comp_dinov2.py``) saves its towers with transformers' ``save_pretrained``: a ``config.json`` of the
HF family (SigLIP, possibly the full ``siglip`` config with a ``vision_config``; DINOv2) plus the CoMP
fields ``use_rope`` and ``spatial_merge_size``, and weights whose names are HF's, with two
differences that HF's own classes cannot load:

* SigLIP (``CoMPSiglipVisionModel``, keys under ``vision_model.``) has no ``post_layernorm`` and no
  attention-pooling head;
* DINOv2 (``CoMPDinov2Model``, keys at the top level, DINOv2's original sub-module names) has no
  CLS or mask token; its position table keeps the CLS row, which the forward never reads.

Both may carry the VLM's ``merger.*`` (the release loads them with ``w_merger=False`` for features;
so does :func:`load_official_vit`). Both add the interpolated position table in raster order to
window-order patches, hence ``pos_embed_order: official`` on every tower loaded here. Inside a CoMP-MM
VLM the same tower sits under ``visual.`` (:mod:`cmpt.vlm.official_release`). No AIMv2 tower is in
the release's code, so its layout is unknown and such checkpoints are refused with that reason.
"""

from __future__ import annotations

import contextlib
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from cmpt.hub import read_json, reading_safetensors
from cmpt.paths import user_path

from .convert import convert_state, image_stats
from .vit import NativeViT, NativeViTConfig

WEIGHTS, INDEX = "model.safetensors", "model.safetensors.index.json"
VLM_ARCHITECTURE = "SliMMForConditionalGeneration"  # the CoMP-MM class (slimm/model/slimm.py)

#: Prefix of each family's tower keys inside a CoMP-VFM directory.
TOWER_PREFIX = {"siglip": "vision_model.", "dinov2": ""}

#: Every weight of a release tower, keys without :data:`TOWER_PREFIX` (the exact mapping to NativeViT
#: is :func:`cmpt.vision.convert.convert_state`'s, docs/method.md §1.5).
TOWER_KEYS = {
    "siglip": re.compile(
        r"embeddings\.(patch_embedding\.(weight|bias)|position_embedding\.weight)"
        r"|encoder\.layers\.\d+\.(layer_norm[12]|self_attn\.(q|k|v|out)_proj|mlp\.fc[12])\.(weight|bias)"
    ),
    "dinov2": re.compile(
        r"embeddings\.(position_embeddings|patch_embeddings\.projection\.(weight|bias))"
        r"|encoder\.layer\.\d+\.(layer_scale[12]\.lambda1|(norm[12]|attention\.attention\.(query|key|value)"
        r"|attention\.output\.dense|mlp\.(fc[12]|weights_in|weights_out))\.(weight|bias))"
        r"|layernorm\.(weight|bias)"
    ),
}
_HF_TYPE = {"siglip": "siglip_vision_model", "dinov2": "dinov2"}
_CONFIG_TYPES = {"siglip": ("siglip", "siglip_vision_model"), "dinov2": ("dinov2",)}
_RELEASE_CLASSES = ("CoMPSiglipVisionModel", "CoMPDinov2Model")  # the towers' classes in config.json
_RELEASE_FIELDS = ("use_rope", "spatial_merge_size")


def weight_files(directory: str | Path) -> list[Path]:
    """The safetensors files of an HF-style directory (one file or the shards of an index)."""
    d = Path(directory)
    if (d / INDEX).is_file():
        shards = sorted(set(read_json(d / INDEX)["weight_map"].values()))
        missing = [s for s in shards if not (d / s).is_file()]
        if missing:
            raise FileNotFoundError(f"{d / INDEX} lists shards that are not there: {missing[:3]}")
        return [d / s for s in shards]
    if (d / WEIGHTS).is_file():
        return [d / WEIGHTS]
    raise FileNotFoundError(f"{d} has neither {WEIGHTS} nor {INDEX}: not a checkpoint directory")


def read_keys(directory: str | Path) -> set[str]:
    """Every tensor name of the directory's safetensors files (headers only); a truncated or corrupt
    file is a :class:`~cmpt.hub.CorruptFileError` naming it."""
    keys: set[str] = set()
    for f in weight_files(directory):
        with reading_safetensors(f), safe_open(str(f), framework="pt") as fh:
            keys.update(fh.keys())
    return keys


_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}  # fmt: skip


def read_state(directory: str | Path, prefix: str = "", *, weights: bool = True) -> dict[str, torch.Tensor]:
    """The tensors whose names start with ``prefix``, keyed without it (CPU, stored dtype);
    ``weights=False``: meta tensors of the stored shapes and dtypes (headers only)."""
    out = {}
    for f in weight_files(directory):
        with reading_safetensors(f), safe_open(str(f), framework="pt") as fh:
            names = fh.keys()  # a safe_open handle is not iterable
            for key in names:
                if not key.startswith(prefix):
                    continue
                if weights:
                    out[key[len(prefix) :]] = fh.get_tensor(key)
                else:
                    info = fh.get_slice(key)
                    shape, dtype = info.get_shape(), _DTYPES[info.get_dtype()]
                    out[key[len(prefix) :]] = torch.empty(shape, dtype=dtype, device="meta")
    return out


def read_config(directory: str | Path) -> dict[str, Any]:
    """``config.json`` of a checkpoint directory, or of the JSON file itself (malformed JSON: a
    :class:`~cmpt.hub.CorruptFileError` naming it)."""
    path = Path(directory)
    file = path / "config.json" if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(f"{path} has no config.json: not a Hugging Face checkpoint directory")
    return read_json(file)


def tower_family(keys: set[str], prefix: str = "") -> str | None:
    """``siglip`` / ``dinov2`` when ``keys`` hold a release tower under ``prefix``, else None.

    HF's own SigLIP always has ``post_layernorm`` and HF's DINOv2 a CLS token; the release's have none.
    """
    if f"{prefix}vision_model.encoder.layers.0.self_attn.q_proj.weight" in keys:
        return None if f"{prefix}vision_model.post_layernorm.weight" in keys else "siglip"
    if f"{prefix}embeddings.position_embeddings" in keys and f"{prefix}encoder.layer.0.norm1.weight" in keys:
        return None if f"{prefix}embeddings.cls_token" in keys else "dinov2"
    return None


def detect_official_layout(path: str | Path) -> str | None:
    """``"vlm"`` (a CoMP-MM directory), ``"vit"`` (a CoMP-VFM tower) or None (anything else:
    a cmpt directory, an HF checkpoint, no weights). Reads only ``config.json`` and tensor names."""
    d = Path(path)
    if not (d / "config.json").is_file():
        return None
    raw = read_config(d)
    if "cmpt_model" in raw:
        return None
    try:
        keys = read_keys(d)
    except FileNotFoundError:
        return None
    if VLM_ARCHITECTURE in (raw.get("architectures") or []) or (
        "model.embed_tokens.weight" in keys and tower_family(keys, "visual.") is not None
    ):  # HF's Qwen2-VL has visual. too, but not a CoMP tower
        return "vlm"
    return "vit" if tower_family(keys) is not None else None


def release_tower_dir(name_or_path: str | Path) -> Path | None:
    """The local directory of a CoMP-VFM tower of the release (:func:`detect_official_layout` says
    ``"vit"``) named by a path or hub id, else None (a cmpt directory, an HF checkpoint, no such path).

    Decided from ``config.json`` first: only one that names a release class or carries the release's
    fields (``use_rope`` / ``spatial_merge_size``) has its weights' names read (for a hub id: its
    weight files downloaded), so an HF or cmpt checkpoint's weight files are neither fetched nor
    opened (a meta build, ``weights=False``, reads none)."""
    from cmpt.hub import CONFIG_FILES, WEIGHT_FILES, is_hub_id, local_model_dir

    hub = is_hub_id(name_or_path)
    if hub:
        d = local_model_dir(name_or_path, "vision checkpoint", allow_patterns=CONFIG_FILES)
    else:
        d = user_path(name_or_path)
    if not (d / "config.json").is_file():
        return None
    raw = read_config(d)
    vision = raw.get("vision_config") if isinstance(raw.get("vision_config"), dict) else {}
    release_class = set(raw.get("architectures") or []) & set(_RELEASE_CLASSES)
    if "cmpt_model" in raw or not (release_class or any(k in raw or k in vision for k in _RELEASE_FIELDS)):
        return None
    if hub:
        d = local_model_dir(name_or_path, "vision checkpoint", allow_patterns=WEIGHT_FILES)
    return d if detect_official_layout(d) == "vit" else None


def hf_tower_config(family: str, raw: dict[str, Any], source: str) -> Any:
    """The HF vision config (``SiglipVisionConfig`` / ``Dinov2Config``) of a release tower's
    ``config.json`` (``raw``); ``source`` names it in errors."""
    import transformers as tf

    model_type = raw.get("model_type")
    if model_type not in _CONFIG_TYPES[family]:
        raise ValueError(
            f"{source}: config.json has model_type {model_type!r}, but the weights are a CoMP {family} "
            f"tower (expected one of {_CONFIG_TYPES[family]}); pass the tower's own config"
        )
    if family == "dinov2":
        return tf.Dinov2Config.from_dict(raw)
    vision = raw.get("vision_config") if model_type == "siglip" else raw
    if not isinstance(vision, dict):
        raise ValueError(f"{source}: a 'siglip' config.json needs its 'vision_config' section")
    return tf.SiglipVisionConfig.from_dict({**vision, "model_type": "siglip_vision_model"})


def release_settings(raw: dict[str, Any]) -> dict[str, Any]:
    """NativeViT settings from the release's config fields: ``use_rope`` (default on, the release's
    default) and ``spatial_merge_size`` (default 2), read at the top level or in ``vision_config``."""
    vision = raw.get("vision_config") if isinstance(raw.get("vision_config"), dict) else {}
    return {
        "rope": bool(raw.get("use_rope", vision.get("use_rope", True))),
        "merge_size": int(raw.get("spatial_merge_size", vision.get("spatial_merge_size", 2))),
    }


def build_tower(
    family: str,
    hf_config: Any,
    state: dict[str, torch.Tensor],
    source: str,
    *,
    weights: bool = True,
    **settings: Any,
) -> NativeViT:
    """A NativeViT (float32) from a release tower's HF config and its weights (keys without prefix),
    with ``pos_embed_order: official``; ``settings`` replace converted config fields (None values
    are ignored, as in ``NativeViT.from_pretrained``). ``weights=False``: ``state`` holds meta
    tensors and the tower is a meta-device skeleton (FSDP2 ranks > 0, docs/method.md §6)."""
    unknown = sorted(k for k in state if not TOWER_KEYS[family].fullmatch(k))
    if unknown:
        raise ValueError(
            f"{source}: {len(unknown)} weights are not part of the CoMP {family} tower (e.g. {unknown[:3]}); "
            "this checkpoint is not in the release's layout"
        )
    cfg, converted = convert_state(_HF_TYPE[family], hf_config, {k: v.float() for k, v in state.items()})
    fields = {**cfg.__dict__, "keep_prefix_tokens": False, "source": f"comp-release:{family}"}
    given = {k: v for k, v in settings.items() if v is not None}
    config = NativeViTConfig.from_dict({**fields, "pos_embed_order": "official", **given})
    with contextlib.nullcontext() if weights else torch.device("meta"):
        model = NativeViT(config)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(converted))
    wrong = [
        f"{k} {tuple(v.shape)} vs {tuple(expected[k].shape)}"
        for k, v in converted.items()
        if k in expected and v.shape != expected[k].shape
    ]
    if missing or wrong:
        raise ValueError(
            f"{source}: the weights do not match the tower's config (missing {missing[:3]}, "
            f"shape in weights vs config {wrong[:3]}); is the config.json the one of this tower?"
        )
    model.load_state_dict(converted, assign=not weights)
    return model


def load_official_vit(
    path: str | Path, device: str | torch.device | None = None, *, weights: bool = True, **overrides: Any
) -> NativeViT:
    """Load a CoMP-VFM directory of the release (SigLIP or DINOv2 tower) as a NativeViT (docs/method.md
    §1.5): ``pos_embed_order: official``, RoPE as ``use_rope`` says, image mean/std from the
    checkpoint's ``preprocessor_config.json``, no pooling head (pooled output = patch mean).
    ``overrides`` replace NativeViT config fields (e.g. ``attn``, ``keep_prefix_tokens``; None values
    are ignored: ``rope=None`` keeps ``use_rope``). ``weights=False``: a meta-device skeleton from
    the config and the weights' headers (FSDP2 ranks > 0, docs/method.md §6)."""
    d = Path(path)
    family = tower_family(read_keys(d))
    if family is None:
        raise ValueError(
            f"{d} is not a CoMP-VFM tower of the release (no SigLIP tower without post_layernorm under "
            "'vision_model.', no DINOv2 tower without CLS token; the release has no AIMv2 tower code, so "
            "no AIMv2 layout is known); for Hugging Face checkpoints use NativeViT.from_hf, for cmpt "
            "directories NativeViT.from_pretrained"
        )
    raw = read_config(d)
    hf_config = hf_tower_config(family, raw, str(d / "config.json"))
    state = read_state(d, TOWER_PREFIX[family], weights=weights)
    state = {k: v for k, v in state.items() if not k.startswith("merger.")}  # the release's w_merger=False
    given = {k: v for k, v in overrides.items() if v is not None}  # rope=None must not drop use_rope
    settings = {**release_settings(raw), **image_stats(d), **given}
    model = build_tower(family, hf_config, state, str(d), weights=weights, **settings)
    return model.to(device) if device is not None else model
