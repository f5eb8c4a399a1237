"""Hugging Face vision checkpoints → :class:`NativeViT` (docs/method.md §1 "Families to load").

One converter per family: a config translation plus a state-dict key filter, in the spirit of timm's
``checkpoint_filter_fn``, taking the HF vision config and the tower's state dict. The HF model class does
the reading (safetensors or legacy ``.bin``, sharding, legacy key renames), so any checkpoint Hugging Face
loads, cmpt loads. :func:`convert_state` exposes the converters to checkpoints that HF's classes cannot
read, such as the CoMP release's towers (:mod:`cmpt.vision.official_release`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from cmpt.hub import CONFIG_FILES, local_model_dir, read_json, reading_safetensors

from .vit import NativeViT, NativeViTConfig

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
_ACTS = {
    "gelu": "gelu",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_new": "gelu_tanh",
    "gelu_fast": "gelu_tanh",
    "quick_gelu": "quick_gelu",
    "silu": "swiglu",
    "swish": "swiglu",
}


def _act(name: str, family: str) -> str:
    if name not in _ACTS:
        raise ValueError(
            f"{family}: activation {name!r} is not supported by NativeViT (supported: {sorted(_ACTS)})"
        )
    return _ACTS[name]


def _grid(num_positions: int, family: str) -> int:
    g = round(num_positions**0.5)
    if g * g != num_positions:
        raise ValueError(f"{family}: position table of {num_positions} rows is not a square grid")
    return g


def _config(c, family: str, **fields) -> NativeViTConfig:
    """A NativeViTConfig with the fields every HF vision config names alike, plus ``fields``."""
    shared = dict(
        patch_size=c.patch_size,
        hidden_size=c.hidden_size,
        num_layers=c.num_hidden_layers,
        num_heads=c.num_attention_heads,
        source=f"hf:{family}",
    )
    return NativeViTConfig(**{**shared, **fields})


def _qkv(sd: dict, prefix: str, q: str, k: str, v: str) -> dict:
    out = {f"{prefix}.weight": torch.cat([sd[f"{q}.weight"], sd[f"{k}.weight"], sd[f"{v}.weight"]])}
    if f"{q}.bias" in sd:
        out[f"{prefix}.bias"] = torch.cat([sd[f"{q}.bias"], sd[f"{k}.bias"], sd[f"{v}.bias"]])
    return out


def _copy(sd: dict, dst: str, src: str) -> dict:
    return {f"{dst}.{s}": sd[f"{src}.{s}"] for s in ("weight", "bias") if f"{src}.{s}" in sd}


def _patch(sd: dict, key: str) -> dict:
    w = sd[f"{key}.weight"]
    out = {"patch_embed.weight": w.reshape(w.shape[0], -1)}
    if f"{key}.bias" in sd:
        out["patch_embed.bias"] = sd[f"{key}.bias"]
    return out


# transformers < 5.23 names DINOv2's submodules as the original release did; map them to the current
# names so that one converter serves every transformers 5.x (a timm-style key filter).
_DINOV2_LEGACY = {
    ".attention.attention.query.": ".attention.q_proj.",
    ".attention.attention.key.": ".attention.k_proj.",
    ".attention.attention.value.": ".attention.v_proj.",
    ".attention.output.dense.": ".attention.o_proj.",
    ".mlp.weights_out.": ".mlp.down_proj.",
}


def _dinov2_current_names(sd: dict) -> dict:
    out = {}
    for key, t in sd.items():
        if ".mlp.weights_in." in key:  # fused [gate; up] rows: silu(first half) * second half
            gate, up = t.chunk(2, dim=0)
            out[key.replace(".weights_in.", ".gate_proj.")] = gate
            out[key.replace(".weights_in.", ".up_proj.")] = up
            continue
        for old, new in _DINOV2_LEGACY.items():
            key = key.replace(old, new)
        out[key] = t
    return out


def _dinov2(c, sd: dict) -> tuple[NativeViTConfig, dict]:
    sd = _dinov2_current_names(sd)
    has_cls = "embeddings.cls_token" in sd  # the CoMP release's tower has none (its table keeps the row)
    swiglu = getattr(c, "use_swiglu_ffn", False)
    hidden = int(c.hidden_size * c.mlp_ratio)
    if swiglu:
        hidden = (int(hidden * 2 / 3) + 7) // 8 * 8
    regs = getattr(c, "num_register_tokens", 0)
    cfg = _config(
        c,
        c.model_type,
        intermediate_size=hidden,
        norm="layernorm",
        norm_eps=c.layer_norm_eps,
        mlp="swiglu" if swiglu else _act(c.hidden_act, "dinov2"),
        qkv_bias=c.qkv_bias,
        layerscale_init=c.layerscale_value,
        cls_token=has_cls,
        num_register_tokens=regs,
        pos_grid=_grid(sd["embeddings.position_embeddings"].shape[1] - 1, "dinov2"),
        pos_cls=has_cls,
        pos_antialias=regs > 0,  # HF's Dinov2WithRegisters interpolates with antialias=True
        pool="cls" if has_cls else "mean",
        image_mean=IMAGENET_MEAN,
        image_std=IMAGENET_STD,
    )
    pos = sd["embeddings.position_embeddings"][0]
    out = {"pos_embed": pos[1:]}
    if has_cls:
        out |= {"cls_token": sd["embeddings.cls_token"].reshape(1, -1), "cls_pos": pos[:1]}
    out |= _patch(sd, "embeddings.patch_embeddings.projection")
    if regs:
        out["register_tokens"] = sd["embeddings.register_tokens"].reshape(regs, -1)
    for i in range(c.num_hidden_layers):
        s, d = f"encoder.layer.{i}", f"blocks.{i}"
        out |= _copy(sd, f"{d}.norm1", f"{s}.norm1") | _copy(sd, f"{d}.norm2", f"{s}.norm2")
        a = f"{s}.attention"
        out |= _qkv(sd, f"{d}.attn.qkv", f"{a}.q_proj", f"{a}.k_proj", f"{a}.v_proj")
        out |= _copy(sd, f"{d}.attn.proj", f"{a}.o_proj")
        out[f"{d}.ls1.gamma"] = sd[f"{s}.layer_scale1.lambda1"]
        out[f"{d}.ls2.gamma"] = sd[f"{s}.layer_scale2.lambda1"]
        if swiglu:
            m = f"{s}.mlp"
            out |= _swiglu(sd, d, f"{m}.gate_proj", f"{m}.up_proj", f"{m}.down_proj")
        else:
            out |= _copy(sd, f"{d}.mlp.fc1", f"{s}.mlp.fc1") | _copy(sd, f"{d}.mlp.fc2", f"{s}.mlp.fc2")
    out |= _copy(sd, "norm", "layernorm")
    return cfg, out


def _swiglu(sd: dict, d: str, gate: str, up: str, down: str) -> dict:
    out = {f"{d}.mlp.fc1.weight": torch.cat([sd[f"{gate}.weight"], sd[f"{up}.weight"]])}
    if f"{gate}.bias" in sd:
        out[f"{d}.mlp.fc1.bias"] = torch.cat([sd[f"{gate}.bias"], sd[f"{up}.bias"]])
    return out | _copy(sd, f"{d}.mlp.fc2", down)


def _clip_like_layers(sd: dict, n: int) -> dict:
    out = {}
    for i in range(n):
        s, d = f"encoder.layers.{i}", f"blocks.{i}"
        a = f"{s}.self_attn"
        out |= _copy(sd, f"{d}.norm1", f"{s}.layer_norm1") | _copy(sd, f"{d}.norm2", f"{s}.layer_norm2")
        out |= _qkv(sd, f"{d}.attn.qkv", f"{a}.q_proj", f"{a}.k_proj", f"{a}.v_proj")
        out |= _copy(sd, f"{d}.attn.proj", f"{a}.out_proj")
        out |= _copy(sd, f"{d}.mlp.fc1", f"{s}.mlp.fc1") | _copy(sd, f"{d}.mlp.fc2", f"{s}.mlp.fc2")
    return out


def _siglip(c, sd: dict) -> tuple[NativeViTConfig, dict]:
    use_head = "head.probe" in sd
    cfg = _config(
        c,
        "siglip",
        intermediate_size=c.intermediate_size,
        norm_eps=c.layer_norm_eps,
        mlp=_act(c.hidden_act, "siglip"),
        pos_grid=_grid(sd["embeddings.position_embedding.weight"].shape[0], "siglip"),
        final_norm="post_layernorm.weight" in sd,  # the CoMP release's tower has none (docs/method.md §1.3)
        pool="map" if use_head else "mean",
        image_mean=(0.5, 0.5, 0.5),
        image_std=(0.5, 0.5, 0.5),
    )
    out = _patch(sd, "embeddings.patch_embedding") | {"pos_embed": sd["embeddings.position_embedding.weight"]}
    out |= _clip_like_layers(sd, c.num_hidden_layers) | _copy(sd, "norm", "post_layernorm")
    if use_head:
        d = c.hidden_size
        w, b = sd["head.attention.in_proj_weight"], sd["head.attention.in_proj_bias"]
        out |= {
            "head.probe": sd["head.probe"].reshape(1, d),
            "head.q_proj.weight": w[:d],
            "head.q_proj.bias": b[:d],
            "head.kv_proj.weight": w[d:],
            "head.kv_proj.bias": b[d:],
        }
        out |= _copy(sd, "head.out_proj", "head.attention.out_proj") | _copy(
            sd, "head.norm", "head.layernorm"
        )
        out |= _copy(sd, "head.mlp.fc1", "head.mlp.fc1") | _copy(sd, "head.mlp.fc2", "head.mlp.fc2")
    return cfg, out


def _clip(c, sd: dict) -> tuple[NativeViTConfig, dict]:
    cfg = _config(
        c,
        "clip",
        intermediate_size=c.intermediate_size,
        norm_eps=c.layer_norm_eps,
        mlp=_act(c.hidden_act, "clip"),
        patch_bias=False,
        cls_token=True,
        pos_grid=_grid(sd["embeddings.position_embedding.weight"].shape[0] - 1, "clip"),
        pos_cls=True,
        pre_norm=True,
        final_norm=False,  # CLIP's last_hidden_state is the raw encoder output
        pool="cls",
        pool_norm=True,  # post_layernorm applies to the pooled CLS only
        image_mean=CLIP_MEAN,
        image_std=CLIP_STD,
    )
    pos = sd["embeddings.position_embedding.weight"]
    out = _patch(sd, "embeddings.patch_embedding")
    out |= {
        "cls_token": sd["embeddings.class_embedding"].reshape(1, -1),
        "cls_pos": pos[:1],
        "pos_embed": pos[1:],
    }
    out |= _copy(sd, "pre_norm", "pre_layrnorm") | _clip_like_layers(sd, c.num_hidden_layers)
    out |= _copy(sd, "pool_norm", "post_layernorm")
    return cfg, out


def _aimv2(c, sd: dict) -> tuple[NativeViTConfig, dict]:
    native = bool(getattr(c, "is_native", False))
    cfg = _config(
        c,
        "aimv2" + ("-native" if native else ""),
        intermediate_size=c.intermediate_size,
        norm="rmsnorm",
        norm_eps=c.rms_norm_eps,
        mlp=_act(c.hidden_act, "aimv2"),
        qkv_bias=c.qkv_bias,
        proj_bias=c.qkv_bias,
        mlp_bias=c.mlp_bias,
        pos_embed="sincos" if native else "learned",
        pos_grid=c.image_size // c.patch_size,
        patch_norm=True,
        pool="mean",  # AIMv2's attention-pooling head is not converted; pooled output = patch mean
        image_mean=CLIP_MEAN,
        image_std=CLIP_STD,
    )
    out = _patch(sd, "embeddings.patch_embed") | _copy(sd, "patch_norm", "embeddings.rms_norm")
    if not native:
        out["pos_embed"] = sd["embeddings.position_embedding.weight"]
    for i in range(c.num_hidden_layers):
        s, d = f"encoder.layers.{i}", f"blocks.{i}"
        a, f = f"{s}.attention", f"{s}.ffn"
        out |= _copy(sd, f"{d}.norm1", f"{s}.rms_norm1") | _copy(sd, f"{d}.norm2", f"{s}.rms_norm2")
        out |= _qkv(sd, f"{d}.attn.qkv", f"{a}.q_proj", f"{a}.k_proj", f"{a}.v_proj")
        out |= _copy(sd, f"{d}.attn.proj", f"{a}.out_proj")
        out |= _swiglu(sd, d, f"{f}.gate_proj", f"{f}.up_proj", f"{f}.down_proj")
    out |= _copy(sd, "norm", "rms_norm")
    return cfg, out


def _families() -> dict[str, tuple[Callable[[], type], Callable]]:
    import transformers as tf

    return {
        "dinov2": (lambda: tf.Dinov2Model, _dinov2),
        "dinov2_with_registers": (lambda: tf.Dinov2WithRegistersModel, _dinov2),
        "siglip": (lambda: tf.SiglipVisionModel, _siglip),
        "siglip_vision_model": (lambda: tf.SiglipVisionModel, _siglip),
        "clip": (lambda: tf.CLIPVisionModel, _clip),
        "clip_vision_model": (lambda: tf.CLIPVisionModel, _clip),
        "aimv2": (lambda: tf.Aimv2Model, _aimv2),
        "aimv2_vision_model": (lambda: tf.Aimv2VisionModel, _aimv2),
    }


def convert_state(model_type: str, config: Any, state: dict) -> tuple[NativeViTConfig, dict]:
    """``(HF vision config, tower state dict with HF key names)`` → NativeViT config and state dict.

    ``model_type`` is one of :func:`_families`' keys; keys are those of the HF vision transformer
    (``embeddings.…``, ``encoder.…``, without a ``vision_model.`` prefix). Parts the state dict lacks
    and that are optional for the family (SigLIP's ``post_layernorm`` and head, DINOv2's CLS token)
    are left out of the result.
    """
    return _families()[model_type][1](config, state)


def _read_model_type(name_or_path: str | Path) -> str:
    """The ``model_type`` of a checkpoint's ``config.json``: a local directory's (a path that does
    not exist is refused) or a hub id's (its snapshot's configs, :func:`cmpt.hub.local_model_dir`)."""
    path = local_model_dir(name_or_path, "vision checkpoint", allow_patterns=CONFIG_FILES, must_exist=True)
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise FileNotFoundError(f"{name_or_path} has no config.json: not a Hugging Face model directory")
    return read_json(cfg_file).get("model_type", "")


def image_stats(name_or_path: str | Path) -> dict:
    """``image_mean`` / ``image_std`` of the ``preprocessor_config.json`` in a checkpoint directory
    or of a hub id (:func:`cmpt.hub.local_model_dir`); empty when there is none (family defaults)."""
    pre = (
        local_model_dir(name_or_path, "vision checkpoint", allow_patterns=CONFIG_FILES)
        / "preprocessor_config.json"
    )
    if not pre.is_file():
        return {}
    raw = read_json(pre)
    return {
        k2: tuple(raw[k1])
        for k1, k2 in (("image_mean", "image_mean"), ("image_std", "image_std"))
        if k1 in raw
    }


#: What a CoMP VLM's tower changes in a converted checkpoint, per HF model type (docs/method.md §1
#: "Final norm before the merger"): the official SigLIP tower has no ``post_layernorm`` (the
#: merger's own LayerNorm follows); DINOv2 keeps its final ``layernorm``; the rest keep HF's output.
COMP_TOWER_OVERRIDES: dict[str, dict[str, Any]] = {
    "siglip": {"final_norm": False},
    "siglip_vision_model": {"final_norm": False},
}


def comp_tower_overrides(name_or_path: str | Path) -> dict[str, Any]:
    """``load_hf_vit`` overrides that turn an HF vision checkpoint into the official CoMP VLM tower.

    Empty for families whose tower is HF's model as is. Feature extraction (``NativeViT.from_hf``
    alone) does not use them and reproduces HF's ``last_hidden_state``.
    """
    return dict(COMP_TOWER_OVERRIDES.get(_read_model_type(name_or_path), {}))


def load_hf_vit(
    name_or_path: str | Path,
    rope: bool = False,
    keep_prefix_tokens: bool = True,
    attn: str = "auto",
    weights: bool = True,
    **overrides,
) -> NativeViT:
    """Load an HF vision checkpoint (vision tower of a full CLIP/SigLIP/AIMv2 model too) as a NativeViT.

    ``overrides`` replace converted config fields; ``final_norm=False`` drops the last norm (and its
    weights), as :data:`COMP_TOWER_OVERRIDES` does for SigLIP in a CoMP VLM. ``weights=False``: a
    skeleton on the meta device, converted from the HF tower built from its config alone (no weight
    file is read; FSDP2 ranks > 0, docs/method.md §6 "Distributed training"). A truncated or
    corrupt weight file is a :class:`~cmpt.hub.CorruptFileError` naming it.
    """
    model_type = _read_model_type(name_or_path)
    families = _families()
    if model_type not in families:
        raise ValueError(
            f"{name_or_path}: architecture {model_type!r} is not supported by NativeViT.from_hf; supported "
            f"model types: {sorted(families)} (DINOv2, SigLIP, AIMv2, CLIP vision towers)"
        )
    hf_cls, convert = families[model_type]
    if weights:
        with reading_safetensors(name_or_path):
            hf, info = hf_cls().from_pretrained(
                str(name_or_path), dtype=torch.float32, output_loading_info=True
            )
    else:  # the same modules from the config alone; the conversion below only reshapes meta tensors
        hf_config = hf_cls().config_class.from_pretrained(str(name_or_path))
        with torch.device("meta"):
            hf, info = hf_cls()._from_config(hf_config, dtype=torch.float32), {}
    missing = [k for k in info.get("missing_keys", []) if not k.endswith("mask_token")]
    if missing:
        raise ValueError(
            f"{name_or_path}: the checkpoint lacks {len(missing)} weights of its declared architecture "
            f"{model_type!r} (e.g. {sorted(missing)[:3]}); it is incomplete or not a {model_type}"
        )
    vm = getattr(hf, "vision_model", hf)  # the vision tower of a full CLIP / SigLIP / AIMv2 model
    cfg, state = convert(vm.config, vm.state_dict())
    settings = {
        "rope": rope,
        "keep_prefix_tokens": keep_prefix_tokens,
        "attn": attn,
        **image_stats(name_or_path),
    }
    config = NativeViTConfig.from_dict({**cfg.__dict__, **settings, **overrides})
    if not config.final_norm:  # final norm switched off (CoMP SigLIP tower): its weights are unused
        state = {k: v for k, v in state.items() if not k.startswith("norm.")}
    with torch.device("meta") if not weights else contextlib.nullcontext():
        model = NativeViT(config)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=not weights)
    if missing or unexpected:
        raise RuntimeError(f"{name_or_path}: conversion bug, missing={missing} unexpected={unexpected}")
    return model
