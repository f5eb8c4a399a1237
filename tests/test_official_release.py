"""The CoMP release's own checkpoints (docs/method.md §1.5): tiny CoMP-VFM towers and a CoMP-MM VLM
written in the release's layout (config fields and weight names of SliMM-X/CoMP-MM @ 77f8b4e) load,
give the release's outputs, and train on.

The reference forward below is re-implemented from the release's modules (``comp_siglip.py``,
``comp_dinov2.py``, ``merger.py``), independently of cmpt's code: conv patch embedding, the position
table bicubically resized per image and added in *raster* order to window-order patches, Qwen2-VL
vision RoPE on q/k, block-diagonal attention, the PatchMerger on 4 consecutive rows.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

import hf_tiny
from cmpt.demo.tiny_lm import build_tiny_causal_lm, default_corpus, train_tokenizer
from cmpt.recipes.comp import LossConfig
from cmpt.recipes.comp_objective import CompObjective
from cmpt.vision.official_release import detect_official_layout, load_official_vit
from cmpt.vision.vit import NativeViT
from cmpt.vlm.chat import ensure_vision_tokens
from cmpt.vlm.model import VisionLanguageModel
from cmpt.vlm.official_release import convert_official, load_official_vlm
from vlm_fixtures import TWO, make_batch

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


def _patches(seed: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    n = sum(h * w for h, w in GRIDS)
    return torch.randn(n, 3 * P * P, generator=torch.Generator().manual_seed(seed)), torch.tensor(GRIDS)


def _err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


# ---------------------------------------------------------------- CoMP-VFM towers


@pytest.mark.parametrize("family,nested", [("siglip", True), ("siglip", False), ("dinov2", False)])
def test_vfm_tower_gives_the_release_outputs(tmp_path, family, nested):
    d = write_vfm(tmp_path, family, nested=nested)
    assert detect_official_layout(d) == "vit"
    vit = load_official_vit(d).eval()
    c = vit.config
    assert (c.pos_embed_order, c.rope, c.merge_size, c.keep_prefix_tokens) == ("official", True, 2, False)
    assert c.final_norm is (family == "dinov2") and c.cls_token is False
    assert list(c.image_std) == STD[family]
    patches, grids = _patches()
    with torch.no_grad():
        ours = vit(patches, grids)
        ref = reference_tower(family, tower_weights(family), patches, GRIDS)
        assert _err(ours, ref) <= TOL
        c.pos_embed_order = "window"  # cmpt's default order is another model: the test tells them apart
        assert _err(vit(patches, grids), ref) > 1e-3
    direct = NativeViT.from_pretrained(d).eval()  # from_pretrained reads the release's directory itself
    assert direct.config.pos_embed_order == "official"
    with torch.no_grad():
        assert _err(direct(patches, grids), ref) <= TOL
    # `cmpt convert official` writes a NativeViT directory that reloads as the same model
    kind, out = convert_official(d, tmp_path / "converted")
    again = NativeViT.from_pretrained(out)
    assert kind == "vit" and again.config.pos_embed_order == "official"
    with torch.no_grad():
        assert _err(again(patches, grids), ref) <= TOL


def test_vfm_rope_follows_use_rope(tmp_path):
    d = write_vfm(tmp_path, "dinov2", use_rope=False)
    vit = load_official_vit(d, rope=None).eval()  # None keeps the checkpoint's setting
    assert vit.config.rope is False and load_official_vit(d, rope=True).config.rope is True
    patches, grids = _patches(4)
    with torch.no_grad():
        ref = reference_tower("dinov2", tower_weights("dinov2"), patches, GRIDS, use_rope=False)
        assert _err(vit(patches, grids), ref) <= TOL


def test_sharded_checkpoint_loads_like_one_file(tmp_path):
    d = write_vfm(tmp_path, "siglip")
    one = load_official_vit(d).state_dict()
    weights = tower_weights("siglip")
    names = sorted(weights)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for shard, keys in shards.items():
        save_file({k: weights[k] for k in keys}, str(d / shard))
    index = {"metadata": {}, "weight_map": {k: shard for shard, keys in shards.items() for k in keys}}
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    (d / "model.safetensors").unlink()
    sharded = load_official_vit(d).state_dict()
    assert sharded.keys() == one.keys() and all(torch.equal(sharded[k], one[k]) for k in one)


def test_other_layouts_are_not_taken_for_the_release(tmp_path):
    hf = hf_tiny.save("siglip", tmp_path)  # HF's own SigLIP (post_layernorm, head): not the release
    assert detect_official_layout(hf) is None
    with pytest.raises(ValueError, match=r"NativeViT\.from_hf"):
        load_official_vit(hf)
    with pytest.raises(ValueError, match="not a checkpoint of the CoMP release"):
        convert_official(hf, tmp_path / "x")
    assert detect_official_layout(tmp_path / "nothing") is None
    qwen2vl = tmp_path / "qwen2-vl"  # Qwen2-VL's own layout (its tower under visual. is no CoMP tower)
    qwen2vl.mkdir()
    weights = {
        "model.embed_tokens.weight": torch.zeros(2, 2),
        "visual.blocks.0.attn.qkv.weight": torch.ones(2),
    }
    save_file(weights, str(qwen2vl / "model.safetensors"))
    (qwen2vl / "config.json").write_text(json.dumps({"architectures": ["Qwen2VLForConditionalGeneration"]}))
    assert detect_official_layout(qwen2vl) is None


def test_unknown_weights_and_wrong_configs_are_named(tmp_path):
    d = write_vfm(tmp_path, "siglip")
    extra = {**tower_weights("siglip"), "vision_model.head.probe": torch.zeros(1, 1, D)}
    save_file(extra, str(d / "model.safetensors"))
    with pytest.raises(ValueError, match=r"not part of the CoMP siglip tower.*head\.probe"):
        load_official_vit(d)
    save_file(tower_weights("siglip"), str(d / "model.safetensors"))
    cfg = tower_config("siglip")
    cfg["vision_config"]["intermediate_size"] = 2 * FFN
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="do not match the tower's config"):
        load_official_vit(d)
    (d / "config.json").write_text(json.dumps(tower_config("dinov2")))
    with pytest.raises(ValueError, match=r"model_type 'dinov2'.*CoMP siglip tower"):
        load_official_vit(d)


def test_vfm_rope_none_keeps_use_rope(tmp_path):
    """``rope=None`` (``cmpt encode``'s default, ``NativeViT.from_pretrained(d, rope=None)``) keeps the
    tower's ``use_rope``, as it does for every other loader."""
    d = write_vfm(tmp_path, "siglip", use_rope=True)
    assert load_official_vit(d, rope=None).config.rope is True
    assert NativeViT.from_pretrained(d, rope=None).config.rope is True


# ---------------------------------------------------------------- CoMP-MM VLM


@pytest.fixture(scope="module")
def tokenizer():
    tok = train_tokenizer(default_corpus(300), vocab_size=400)
    ensure_vision_tokens(tok)  # Qwen2.5's tokenizer carries the vision tokens
    return tok


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


@pytest.mark.parametrize("family,tied", [("siglip", True), ("dinov2", False)])
def test_vlm_loads_with_the_release_lm_and_tower(tmp_path, tokenizer, family, tied):
    tower_dir = tmp_path / "tower"  # custom_visual_model: the tower's own config, here a local directory
    tower_dir.mkdir()
    (tower_dir / "config.json").write_text(json.dumps(tower_config(family)))
    d, lm = write_vlm(tmp_path, family, tokenizer, tied, tower_ref=str(tower_dir))
    lm.config.rope_parameters = {"rope_type": "default", "rope_theta": 1000000.0}
    ref_lm = type(lm)(lm.config).eval()  # the tiny transformers LM with the same weights and rope_theta
    ref_lm.load_state_dict(lm.state_dict())
    assert detect_official_layout(d) == "vlm"
    vlm = VisionLanguageModel.from_pretrained(d)  # the release's directory itself (load_official_vlm)
    assert vlm.vit.config.pos_embed_order == "official" and vlm.vit.config.rope is True
    assert vlm.processor.max_pixels == 14 * 14 * 4 * 3000 and list(vlm.processor.std) == STD[family]
    assert vlm.config.image_pad_id == tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert (vlm.lm_head.weight is vlm.input_embeddings.weight) is tied

    ids = torch.tensor(tokenizer("the chart shows red bars and a blue line")["input_ids"])
    with torch.no_grad():
        ours = vlm.lm_head(vlm(ids, torch.tensor([0, len(ids)])).hidden)
        ref = ref_lm(ids[None]).logits[0]
        assert _err(ours, ref) <= TOL
        patches, grids = _patches(5)
        w = {**tower_weights(family), **merger_weights()}
        merged = reference_merger(w, reference_tower(family, w, patches, GRIDS))
        assert _err(vlm.encode_images(patches, grids), merged) <= TOL


def test_vlm_trains_on_and_converts(tmp_path, tokenizer):
    tower = tmp_path / "tower.json"
    tower.write_text(json.dumps(tower_config("siglip")))
    d, _ = write_vlm(tmp_path, "siglip", tokenizer, tied=True)  # a hub id not in the cache
    with pytest.raises(FileNotFoundError, match=r"hf download SliMM-X/CoMP-Tiny-Tower.*--vision-config"):
        load_official_vlm(d)
    kind, out = convert_official(d, tmp_path / "cmpt-vlm", vision_config=tower)
    assert kind == "vlm"
    vlm = VisionLanguageModel.from_pretrained(out)  # a normal cmpt VLM directory (model.init of a stage)
    assert vlm.vit.config.pos_embed_order == "official"
    direct = load_official_vlm(d, vision_config=tower)
    batch = make_batch(vlm, TWO)
    with torch.no_grad():
        assert (
            _err(
                vlm.encode_images(batch["patches"], batch["grid_hw"]),
                direct.encode_images(batch["patches"], batch["grid_hw"]),
            )
            == 0
        )

    objective = CompObjective(vlm.train(), LossConfig(align=True))
    before = {n: p.detach().clone() for n, p in vlm.named_parameters()}
    opt = torch.optim.AdamW(vlm.parameters(), lr=1e-3)
    out = objective(batch)
    loss = out["lm_sum"] / out["lm_count"] + 0.05 * out["align_sum"] / out["align_count"]
    loss.backward()
    opt.step()
    assert torch.isfinite(loss)
    moved = {n.split(".")[0] for n, p in vlm.named_parameters() if not torch.equal(p, before[n])}
    assert {"vit", "merger", "llm"} <= moved


def test_cli_convert_official(tmp_path, capsys):
    from cmpt.cli import main

    d = write_vfm(tmp_path, "dinov2")
    assert main(["convert", "official", str(d), str(tmp_path / "out")]) == 0
    assert "pos_embed_order: official" in capsys.readouterr().out
    assert NativeViT.from_pretrained(tmp_path / "out").config.pos_embed_order == "official"
    assert main(["convert", "official", str(tmp_path / "out"), str(tmp_path / "again")]) == 2  # cmpt's own
    assert "not a checkpoint of the CoMP release" in capsys.readouterr().err


class _HeadersOnly:
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


def test_release_layouts_build_as_meta_skeletons(tmp_path, tokenizer, monkeypatch):
    """FSDP2 ranks > 0 (docs/method.md §6): the release's directories give the same modules on the
    meta device, read from configs and the weights' headers only."""
    import cmpt.vision.official_release as official
    from test_meta_build import _assert_skeleton_of

    vfm = write_vfm(tmp_path / "vfm", "siglip")
    tower = tmp_path / "tower.json"
    tower.write_text(json.dumps(tower_config("dinov2")))
    vlm_dir, _ = write_vlm(tmp_path / "vlm", "dinov2", tokenizer, tied=False)
    eager_vit = NativeViT.from_pretrained(vfm)
    eager_vlm = load_official_vlm(vlm_dir, vision_config=tower)
    monkeypatch.setattr(official, "safe_open", _HeadersOnly)
    with pytest.raises(AssertionError, match="read the tensor"):  # the guard is real
        NativeViT.from_pretrained(vfm)
    _assert_skeleton_of(NativeViT.from_pretrained(vfm, weights=False), eager_vit)
    meta = load_official_vlm(vlm_dir, vision_config=tower, weights=False)
    _assert_skeleton_of(meta, eager_vlm)
    assert meta.vit.config == eager_vlm.vit.config and meta.config == eager_vlm.config


# ---------------------------------------------------------------- a CoMP-VFM tower as model.vision


@pytest.fixture(scope="module")
def llm_dir(tmp_path_factory, tokenizer) -> Path:
    d = tmp_path_factory.mktemp("lm")
    build_tiny_causal_lm(tokenizer, "qwen2", hidden_size=LLM_H, seed=5).save_pretrained(str(d))
    tokenizer.save_pretrained(str(d))
    return d


@pytest.mark.parametrize("family", ["siglip", "dinov2"])
def test_build_from_a_vfm_tower(tmp_path, llm_dir, family):
    """``VisionLanguageModel.build(<CoMP-VFM dir>, llm)`` (a CoMP recipe's ``model.vision``) takes the
    release's tower as ``load_official_vit`` reads it, not as an HF checkpoint (docs/method.md §1.5)."""
    d = write_vfm(tmp_path, family)
    want = load_official_vit(d).eval()
    vlm = VisionLanguageModel.build(d, llm_dir)
    c = vlm.vit.config
    assert c == want.config and (c.pos_embed_order, c.rope, c.keep_prefix_tokens) == ("official", True, False)
    assert vlm.config.vision == str(d) and vlm.merger.fc2.out_features == LLM_H
    patches, grids = _patches(6)
    with torch.no_grad():
        ours = vlm.vit(patches, grids)
        assert torch.equal(ours, want(patches, grids))
        assert _err(ours, reference_tower(family, tower_weights(family), patches, GRIDS)) <= TOL
    # rope / keep_prefix_tokens are the caller's; vit_from_hf=False reads it through from_pretrained
    off = VisionLanguageModel.build(d, llm_dir, rope=False, keep_prefix_tokens=True, vit_from_hf=False)
    assert (off.vit.config.rope, off.vit.config.keep_prefix_tokens) == (False, True)
    assert off.vit.config.pos_embed_order == "official"


def test_build_from_a_vfm_tower_as_a_meta_skeleton(tmp_path, llm_dir, monkeypatch):
    """``weights=False`` (FSDP2 ranks > 0, docs/method.md §6): the tower from its config and the
    weights' headers, the LLM from its config; the same modules as the eager build, all on meta."""
    import cmpt.vision.official_release as official
    from test_meta_build import _assert_skeleton_of

    d = write_vfm(tmp_path, "dinov2")
    eager = VisionLanguageModel.build(d, llm_dir, rope=False)
    monkeypatch.setattr(official, "safe_open", _HeadersOnly)
    meta = VisionLanguageModel.build(d, llm_dir, rope=False, weights=False)
    _assert_skeleton_of(meta, eager)
    assert meta.vit.config == eager.vit.config and meta.config == eager.config


def test_release_tower_by_hub_id_fetches_weights_only_for_the_release(tmp_path, monkeypatch):
    """A hub id is decided from its config first: an HF checkpoint's weights are not downloaded."""
    import shutil

    import cmpt.hub as hub
    from cmpt.hub import CONFIG_FILES
    from cmpt.vision.official_release import release_tower_dir

    full = {"org/vfm": write_vfm(tmp_path, "siglip"), "org/hf": hf_tiny.save("siglip", tmp_path)}
    fetched = []

    def snapshot(name, what="model", *, allow_patterns=None, **kw):
        fetched.append((name, allow_patterns))
        if allow_patterns != CONFIG_FILES:
            return full[name]
        configs = tmp_path / "configs" / name
        configs.mkdir(parents=True, exist_ok=True)
        shutil.copy(full[name] / "config.json", configs)
        return configs

    monkeypatch.setattr(hub, "is_hub_id", lambda name: name in full)
    monkeypatch.setattr(hub, "local_model_dir", snapshot)
    assert release_tower_dir("org/vfm") == full["org/vfm"]
    assert release_tower_dir("org/hf") is None
    assert [n for n, patterns in fetched if patterns != CONFIG_FILES] == ["org/vfm"]
    assert release_tower_dir(full["org/vfm"]) == full["org/vfm"] and release_tower_dir(full["org/hf"]) is None


@pytest.mark.parametrize("rank, meta", [(0, False), (1, True)])
def test_comp_recipe_with_a_vfm_tower_as_model_vision(tmp_path, llm_dir, monkeypatch, rank, meta):
    from cmpt.recipes import load_recipe
    from cmpt.recipes.comp import load_model

    monkeypatch.setenv("RANK", str(rank))
    monkeypatch.setenv("WORLD_SIZE", "2")
    d = write_vfm(tmp_path, "siglip")
    sets = [f"model.vision={d}", f"model.llm={llm_dir}", "train.dist=fsdp", "stage.rope=true"]
    cfg, _ = load_recipe("tiny/comp_stage1", sets)
    vlm = load_model(cfg)
    c = vlm.vit.config
    assert (c.pos_embed_order, c.rope, c.final_norm) == ("official", True, False)
    assert c.source == "comp-release:siglip"
    assert {p.is_meta for p in vlm.parameters()} == {meta}
