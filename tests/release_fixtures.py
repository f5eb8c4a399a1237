"""Tiny checkpoints in the CoMP release's own layouts (config fields and weight names of
SliMM-X/CoMP-MM @ 77f8b4e: CoMP-VFM towers, a CoMP-MM VLM) and a reference forward re-implemented
from the release's modules (``comp_siglip.py``, ``comp_dinov2.py``, ``merger.py``) independently of
cmpt's code: conv patch embedding, the position table bicubically resized per image and added in
*raster* order to window-order patches, Qwen2-VL vision RoPE on q/k, block-diagonal attention, the
PatchMerger on 4 consecutive rows (docs/method.md §1.5)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from cmpt.demo.tiny_lm import build_tiny_causal_lm

P, D, HEADS, LAYERS, FFN, G = 14, 32, 4, 2, 64, 8  # tower: 8×8 table (112 px), head dim 8
LLM_H = 64
TOL = 1e-5
GRIDS = [(8, 8), (4, 6), (6, 10)]  # the table's own grid (no resize), smaller, larger
STD = {"siglip": [0.5, 0.5, 0.5], "dinov2": [0.229, 0.224, 0.225]}
MEAN = {"siglip": [0.5, 0.5, 0.5], "dinov2": [0.485, 0.456, 0.406]}


# ---------------------------------------------------------------- the release's layout


def _lin(t: dict, name: str, out: int, inp: int, g: torch.Generator) -> None:
    t[f"{name}.weight"] = torch.randn(out, inp, generator=g) * inp**-0.5
    t[f"{name}.bias"] = torch.randn(out, generator=g) * 0.1


def _norm(t: dict, name: str, dim: int, g: torch.Generator) -> None:
    t[f"{name}.weight"] = 1 + 0.2 * torch.randn(dim, generator=g)
    t[f"{name}.bias"] = 0.1 * torch.randn(dim, generator=g)


def tower_weights(family: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights under the release's names (SigLIP: ``vision_model.…``; DINOv2: top level)."""
    g, t = torch.Generator().manual_seed(seed), {}
    conv = torch.randn(D, 3, P, P, generator=g) * (3 * P * P) ** -0.5
    if family == "siglip":
        t["vision_model.embeddings.patch_embedding.weight"] = conv
        t["vision_model.embeddings.patch_embedding.bias"] = 0.1 * torch.randn(D, generator=g)
        t["vision_model.embeddings.position_embedding.weight"] = torch.randn(G * G, D, generator=g)
        for i in range(LAYERS):
            s = f"vision_model.encoder.layers.{i}"
            _norm(t, f"{s}.layer_norm1", D, g)
            _norm(t, f"{s}.layer_norm2", D, g)
            for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
                _lin(t, f"{s}.self_attn.{proj}", D, D, g)
            _lin(t, f"{s}.mlp.fc1", FFN, D, g)
            _lin(t, f"{s}.mlp.fc2", D, FFN, g)
        return t
    t["embeddings.patch_embeddings.projection.weight"] = conv
    t["embeddings.patch_embeddings.projection.bias"] = 0.1 * torch.randn(D, generator=g)
    t["embeddings.position_embeddings"] = torch.randn(1, G * G + 1, D, generator=g)  # CLS row kept
    for i in range(LAYERS):
        s = f"encoder.layer.{i}"
        _norm(t, f"{s}.norm1", D, g)
        _norm(t, f"{s}.norm2", D, g)
        for proj in ("query", "key", "value"):
            _lin(t, f"{s}.attention.attention.{proj}", D, D, g)
        _lin(t, f"{s}.attention.output.dense", D, D, g)
        t[f"{s}.layer_scale1.lambda1"] = 0.5 + torch.rand(D, generator=g)
        t[f"{s}.layer_scale2.lambda1"] = 0.5 + torch.rand(D, generator=g)
        _lin(t, f"{s}.mlp.fc1", 4 * D, D, g)
        _lin(t, f"{s}.mlp.fc2", D, 4 * D, g)
    _norm(t, "layernorm", D, g)
    return t


def merger_weights(seed: int = 1) -> dict[str, torch.Tensor]:
    g, t = torch.Generator().manual_seed(seed), {}
    _norm(t, "merger.ln_q", D, g)
    _lin(t, "merger.mlp.0", 4 * D, 4 * D, g)
    _lin(t, "merger.mlp.2", LLM_H, 4 * D, g)
    return t


def tower_config(family: str, use_rope: bool = True, nested: bool = True) -> dict:
    """``config.json`` of a release tower: the HF family's config plus the CoMP fields."""
    comp = {"use_rope": use_rope, "spatial_merge_size": 2, "llm_hidden_size": LLM_H}
    shape = dict(
        hidden_size=D, num_hidden_layers=LAYERS, num_attention_heads=HEADS, patch_size=P, image_size=G * P
    )
    if family == "dinov2":
        extra = dict(mlp_ratio=4, hidden_act="gelu", layer_norm_eps=1e-6, layerscale_value=1.0)
        return {"model_type": "dinov2", "architectures": ["CoMPDinov2Model"], **shape, **extra, **comp}
    vision = {
        "model_type": "siglip_vision_model",
        **shape,
        "intermediate_size": FFN,
        "hidden_act": "gelu_pytorch_tanh",
        "layer_norm_eps": 1e-6,
    }
    if not nested:
        return {**vision, "architectures": ["CoMPSiglipVisionModel"], **comp}
    text = {"hidden_size": D, "num_hidden_layers": 1, "num_attention_heads": HEADS, "intermediate_size": FFN}
    head = {"model_type": "siglip", "architectures": ["CoMPSiglipVisionModel"], "text_config": text}
    return {**head, "vision_config": vision, **comp}


def preprocessor(family: str) -> dict:
    """The release's Qwen2-VL image processor config (saved by its processor, temporal patch 1)."""
    return {
        "image_processor_type": "Qwen2VLImageProcessor",
        "processor_class": "SliMMQwen2VLProcessor",
        "do_normalize": True,
        "image_mean": MEAN[family],
        "image_std": STD[family],
        "min_pixels": 3136,
        "max_pixels": 14 * 14 * 4 * 3000,
        "patch_size": P,
        "temporal_patch_size": 1,
        "merge_size": 2,
    }


def write_vfm(root: Path, family: str, **cfg_kw) -> Path:
    d = root / f"vfm-{family}"
    d.mkdir(parents=True, exist_ok=True)
    # the release's towers may carry the VLM's merger (its w_merger=False ignores it)
    save_file({**tower_weights(family), **merger_weights()}, str(d / "model.safetensors"))
    (d / "config.json").write_text(json.dumps(tower_config(family, **cfg_kw)))
    (d / "preprocessor_config.json").write_text(json.dumps(preprocessor(family)))
    return d


# ---------------------------------------------------------------- reference forward (the release's)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], -1) * sin


def _rope(grids) -> tuple[torch.Tensor, torch.Tensor]:
    """Qwen2-VL's vision rotary table: window-order (row, col), inv_freq over head_dim/2, [f, f]."""
    dim = D // HEADS // 2
    inv = 1.0 / (10000.0 ** (torch.arange(0, dim, 2).float() / dim))
    rows, cols = [], []
    for h, w in grids:
        hh = torch.arange(h)[:, None].expand(h, w).reshape(h // 2, 2, w // 2, 2).permute(0, 2, 1, 3)
        ww = torch.arange(w)[None, :].expand(h, w).reshape(h // 2, 2, w // 2, 2).permute(0, 2, 1, 3)
        rows.append(hh.flatten())
        cols.append(ww.flatten())
    freqs = torch.cat([torch.cat(rows)[:, None] * inv, torch.cat(cols)[:, None] * inv], -1)
    emb = freqs.repeat(1, 2)[:, None, :]
    return emb.cos(), emb.sin()


def _attention(x, w, q, k, v, o, grids, rope):
    n = x.shape[0]
    qs, ks, vs = (F.linear(x, w[f"{m}.weight"], w[f"{m}.bias"]).view(n, HEADS, -1) for m in (q, k, v))
    if rope is not None:
        qs, ks = _rotate(qs, *rope), _rotate(ks, *rope)
    outs, start = [], 0
    for h, wd in grids:  # block-diagonal: each image alone
        sl = slice(start, start + h * wd)
        a, b, c = qs[sl].transpose(0, 1), ks[sl].transpose(0, 1), vs[sl].transpose(0, 1)
        att = torch.softmax(a @ b.transpose(1, 2) / (a.shape[-1] ** 0.5), -1)
        outs.append((att @ c).transpose(0, 1).reshape(h * wd, -1))
        start += h * wd
    return F.linear(torch.cat(outs), w[f"{o}.weight"], w[f"{o}.bias"])


def reference_tower(
    family: str, w: dict, patches: torch.Tensor, grids, use_rope: bool = True
) -> torch.Tensor:
    """The release's tower forward on window-order patches (N, 3·p·p) → (N, D)."""
    sw = family == "siglip"
    pre = "vision_model." if sw else ""
    conv = "embeddings.patch_embedding" if sw else "embeddings.patch_embeddings.projection"
    x = F.conv2d(patches.view(-1, 3, P, P), w[f"{pre}{conv}.weight"], w[f"{pre}{conv}.bias"], stride=P)
    x = x.view(-1, D)
    table = (
        w[f"{pre}embeddings.position_embedding.weight"] if sw else w["embeddings.position_embeddings"][0, 1:]
    )
    pos = []
    for h, wd in grids:
        if (h, wd) == (G, G):
            pos.append(table)
            continue
        grid = table.reshape(1, G, G, D).permute(0, 3, 1, 2)
        up = F.interpolate(grid, size=(h, wd), mode="bicubic", align_corners=False)
        pos.append(up.permute(0, 2, 3, 1).reshape(h * wd, D))  # raster order, as the release adds it
    x = x + torch.cat(pos)
    rope = _rope(grids) if use_rope else None
    for i in range(LAYERS):
        if sw:
            s = f"vision_model.encoder.layers.{i}"
            n1 = F.layer_norm(x, (D,), w[f"{s}.layer_norm1.weight"], w[f"{s}.layer_norm1.bias"], 1e-6)
            a = f"{s}.self_attn"
            x = x + _attention(
                n1, w, f"{a}.q_proj", f"{a}.k_proj", f"{a}.v_proj", f"{a}.out_proj", grids, rope
            )
            n2 = F.layer_norm(x, (D,), w[f"{s}.layer_norm2.weight"], w[f"{s}.layer_norm2.bias"], 1e-6)
            hid = F.gelu(F.linear(n2, w[f"{s}.mlp.fc1.weight"], w[f"{s}.mlp.fc1.bias"]), approximate="tanh")
            x = x + F.linear(hid, w[f"{s}.mlp.fc2.weight"], w[f"{s}.mlp.fc2.bias"])
        else:
            s = f"encoder.layer.{i}"
            n1 = F.layer_norm(x, (D,), w[f"{s}.norm1.weight"], w[f"{s}.norm1.bias"], 1e-6)
            a = f"{s}.attention"
            names = (
                f"{a}.attention.query",
                f"{a}.attention.key",
                f"{a}.attention.value",
                f"{a}.output.dense",
            )
            x = x + w[f"{s}.layer_scale1.lambda1"] * _attention(n1, w, *names, grids, rope)
            n2 = F.layer_norm(x, (D,), w[f"{s}.norm2.weight"], w[f"{s}.norm2.bias"], 1e-6)
            hid = F.gelu(F.linear(n2, w[f"{s}.mlp.fc1.weight"], w[f"{s}.mlp.fc1.bias"]))
            x = x + w[f"{s}.layer_scale2.lambda1"] * F.linear(
                hid, w[f"{s}.mlp.fc2.weight"], w[f"{s}.mlp.fc2.bias"]
            )
    if not sw:  # the release's DINOv2 keeps its final layernorm; its SigLIP has none
        x = F.layer_norm(x, (D,), w["layernorm.weight"], w["layernorm.bias"], 1e-6)
    return x


def reference_merger(w: dict, x: torch.Tensor) -> torch.Tensor:
    x = F.layer_norm(x, (D,), w["merger.ln_q.weight"], w["merger.ln_q.bias"], 1e-6).view(-1, 4 * D)
    x = F.gelu(F.linear(x, w["merger.mlp.0.weight"], w["merger.mlp.0.bias"]))
    return F.linear(x, w["merger.mlp.2.weight"], w["merger.mlp.2.bias"])


def sample_patches(seed: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    n = sum(h * w for h, w in GRIDS)
    return torch.randn(n, 3 * P * P, generator=torch.Generator().manual_seed(seed)), torch.tensor(GRIDS)


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


# ---------------------------------------------------------------- CoMP-VFM towers


def write_vlm(root: Path, family: str, tok, tied: bool, tower_ref: str | None = None) -> tuple[Path, object]:
    """A CoMP-MM directory as the release's Trainer saves it; returns it and the LM it holds."""
    d = root / f"comp-mm-{family}"
    d.mkdir(parents=True, exist_ok=True)
    lm = build_tiny_causal_lm(tok, "qwen2", hidden_size=LLM_H, tie_word_embeddings=tied, seed=5)
    llm_state = {k: v for k, v in lm.state_dict().items() if not (tied and k == "lm_head.weight")}
    visual = {f"visual.{k}": v for k, v in {**tower_weights(family), **merger_weights()}.items()}
    save_file({**llm_state, **visual}, str(d / "model.safetensors"))
    ids = {t: tok.convert_tokens_to_ids(t) for t in ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>")}
    release = {
        "architectures": ["SliMMForConditionalGeneration"],
        "custom_visual_model": tower_ref or "SliMM-X/CoMP-Tiny-Tower",
        "use_rope": True,
        "use_mrope": True,
        "use_deepstack": False,
        "deepstack_type": "v1",
        "global_interval": None,
        "mm_tunable_parts": "mm_vision_tower,mm_mlp_adapter,mm_language_model,mm_lm_head",
        "rope_scaling": {"type": "default", "mrope_section": [2, 3, 3], "rope_type": "default"},
        "rope_theta": 1000000.0,
        "vision_start_token_id": ids["<|vision_start|>"],
        "vision_end_token_id": ids["<|vision_end|>"],
        "image_token_id": ids["<|image_pad|>"],
    }
    cfg = {k: v for k, v in lm.config.to_dict().items() if k not in ("rope_parameters", "architectures")}
    (d / "config.json").write_text(json.dumps({**cfg, **release}))
    tok.save_pretrained(str(d))
    (d / "preprocessor_config.json").write_text(json.dumps(preprocessor(family)))
    return d, lm


class HeadersOnly:
    """``safe_open`` whose tensors cannot be read: names, shapes and dtypes only."""

    def __init__(self, *args, **kwargs) -> None:
        from safetensors import safe_open

        self._fh = safe_open(*args, **kwargs)

    def __enter__(self):
        self._inner = self._fh.__enter__()
        return self

    def __exit__(self, *exc):
        return self._fh.__exit__(*exc)

    def keys(self):
        return self._inner.keys()

    def get_slice(self, key):
        return self._inner.get_slice(key)

    def get_tensor(self, key):
        raise AssertionError(f"the skeleton read the tensor {key}")
