"""FSDP2 ranks > 0 build the model's skeleton on the meta device from its configs and tokenizer alone
(docs/method.md §6 "Distributed training"): ``weights=False`` on every loader the recipes use, the
recipes' switch (:func:`cmpt.train.distributed.loads_weights`), and two recipe fixes: CoMP's
``model.pos_embed_order`` unset keeps the checkpoint's order (§1.5), MoCa's hub-id ``model.init``
goes through :mod:`cmpt.hub`.

The skeletons are built from copies of the checkpoints whose weight files are overwritten with
garbage: any read of them fails, so a passing build read none. The 2-process runs (the sharded
skeleton equals the eager build bit for bit) are in tests/test_fsdp_full.py.
"""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path

import pytest
from torch import nn
from transformers import AutoConfig

from cmpt.embed.embedder import Embedder
from cmpt.embed.qwen_vl import QwenVLBackbone
from cmpt.hub import CorruptFileError
from cmpt.recipes import load_recipe
from cmpt.recipes.comp import load_model
from cmpt.vision.vit import NativeViT
from cmpt.vlm.model import VisionLanguageModel
from hf_tiny import save as save_hf_vision
from test_qwen_vl_backbone import build_checkpoint
from vlm_fixtures import build_dirs, build_vlm


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("meta_build")
    dirs = build_dirs(root / "parts")
    official = build_vlm(dirs, "qwen2")
    official.save_pretrained(root / "vlm")
    official.vit.config.pos_embed_order = "official"  # as `cmpt convert official` writes it (§1.5)
    official.save_pretrained(root / "vlm_official_order")
    return {
        "vlm": root / "vlm",
        "vlm_official_order": root / "vlm_official_order",
        "vit": dirs / "vit",
        "llm": dirs / "qwen2",
        "hf_vit": save_hf_vision("dinov2", root / "hf"),
        "qwen2_vl": build_checkpoint("qwen2_vl", root / "qwen2_vl"),
    }


def _unreadable(src: Path, dst: Path) -> Path:
    """A copy of ``src`` whose weight files hold garbage (names and sizes kept)."""
    shutil.copytree(src, dst)
    hit = [f for f in dst.rglob("*.safetensors")]
    assert hit, f"no weight file under {src}"
    for f in hit:
        f.write_bytes(b"\xff" * f.stat().st_size)
    return dst


def _assert_skeleton_of(meta: nn.Module, eager: nn.Module) -> None:
    """Same parameters and buffers (names, shapes, dtypes, ties, trainable flags), all on meta."""
    got, want = meta.state_dict(), eager.state_dict()
    assert list(got) == list(want)
    assert [k for k in want if (got[k].shape, got[k].dtype) != (want[k].shape, want[k].dtype)] == []
    assert all(t.is_meta for t in [*meta.parameters(), *meta.buffers()])
    assert not any(t.is_meta for t in [*eager.parameters(), *eager.buffers()])
    assert [n for n, _ in meta.named_buffers()] == [n for n, _ in eager.named_buffers()]

    def ties(m: nn.Module) -> list[list[str]]:
        by_id: dict[int, list[str]] = {}
        for name, p in m.named_parameters(remove_duplicate=False):
            by_id.setdefault(id(p), []).append(name)
        return sorted(names for names in by_id.values() if len(names) > 1)

    assert ties(meta) == ties(eager)
    flags = {n: p.requires_grad for n, p in eager.named_parameters()}
    assert {n: p.requires_grad for n, p in meta.named_parameters()} == flags
    assert meta.training == eager.training


def _llm_config(llm: nn.Module) -> dict:
    return {k: v for k, v in llm.config.to_dict().items() if k != "_name_or_path"}


def test_vlm_directory_skeleton(models, tmp_path) -> None:
    eager = VisionLanguageModel.from_pretrained(models["vlm"], rope=True)
    meta = VisionLanguageModel.from_pretrained(
        _unreadable(models["vlm"], tmp_path / "v"), rope=True, weights=False
    )
    _assert_skeleton_of(meta, eager)
    assert meta.vit.config == eager.vit.config and meta.config == eager.config
    assert _llm_config(meta.llm) == _llm_config(eager.llm)
    assert meta.llm.config._attn_implementation == eager.llm.config._attn_implementation
    assert len(meta.tokenizer) == len(eager.tokenizer) and repr(meta.processor) == repr(eager.processor)
    with pytest.raises(CorruptFileError):  # the guard is real: reading the copy fails
        VisionLanguageModel.from_pretrained(tmp_path / "v")
    embedder = Embedder.from_pretrained(tmp_path / "v", weights=False)  # through load_backbone
    assert all(p.is_meta for p in embedder.backbone.parameters())


def test_built_vlm_skeleton_grows_its_vocabulary_on_meta(models, tmp_path) -> None:
    """Stage I: a NativeViT directory + an HF LM; the vision tokens outgrow the LM's rows, so the
    skeleton's embeddings are resized on the meta device (shapes only)."""
    eager = VisionLanguageModel.build(models["vit"], models["llm"], rope=False)
    vit, llm = _unreadable(models["vit"], tmp_path / "vit"), _unreadable(models["llm"], tmp_path / "llm")
    meta = VisionLanguageModel.build(vit, llm, rope=False, weights=False)
    before = AutoConfig.from_pretrained(models["llm"]).vocab_size
    assert eager.llm.get_input_embeddings().num_embeddings == len(eager.tokenizer) > before
    _assert_skeleton_of(meta, eager)
    assert meta.vit.config == eager.vit.config
    assert replace(meta.config, vision="", llm="") == replace(eager.config, vision="", llm="")  # paths
    assert _llm_config(meta.llm) == _llm_config(eager.llm)


def test_qwen_vl_skeleton(models, tmp_path) -> None:
    eager = QwenVLBackbone.from_pretrained(models["qwen2_vl"])
    meta = QwenVLBackbone.from_pretrained(_unreadable(models["qwen2_vl"], tmp_path / "q"), weights=False)
    for backbone in (eager, meta):
        backbone.resize_token_embeddings(len(backbone.tokenizer) + 2)
    _assert_skeleton_of(meta, eager)
    assert meta.config == eager.config and _llm_config(meta.hf) == _llm_config(eager.hf)


def _as_rank(monkeypatch: pytest.MonkeyPatch, rank: int) -> None:
    monkeypatch.setenv("RANK", str(rank))
    monkeypatch.setenv("WORLD_SIZE", "2")


def _comp_cfg(init: Path, dist: str, *extra: str):
    cfg, _ = load_recipe("tiny/comp_stage2", [f"model.init={init}", f"train.dist={dist}", *extra])
    return cfg


@pytest.mark.parametrize("rank, dist, meta", [(1, "fsdp", True), (0, "fsdp", False), (1, "ddp", False)])
def test_comp_recipe_builds_a_skeleton_on_fsdp_ranks_above_0(models, monkeypatch, rank, dist, meta) -> None:
    _as_rank(monkeypatch, rank)
    vlm = load_model(_comp_cfg(models["vlm"], dist))
    assert {p.is_meta for p in vlm.parameters()} == {meta}


def test_moca_task_skeleton_with_lora(models, monkeypatch, tmp_path) -> None:
    """MoCa CPT on a cmpt VLM: ``<|mask|>`` grows the vocabulary, the MAE decoder is copied from a
    skeleton layer, LoRA adapters are injected on meta; the task equals the eager one in structure."""
    pytest.importorskip("peft")
    sets = [f"model.init={models['vlm']}", "train.dist=fsdp", "model.lora_r=4"]
    cfg, task_cls = load_recipe("tiny/moca_cpt", sets)
    eager = task_cls(cfg)
    _as_rank(monkeypatch, 1)
    cfg.model.init = str(_unreadable(models["vlm"], tmp_path / "v"))
    meta = task_cls(cfg)
    _assert_skeleton_of(meta.model, eager.model)
    assert any("lora_" in n for n, _ in meta.model.named_parameters())
    assert len(meta.backbone.tokenizer) == len(eager.backbone.tokenizer)


def test_pos_embed_order_unset_keeps_the_checkpoints(models) -> None:
    """A converted release checkpoint keeps ``official``; cmpt's own and fresh HF towers keep
    ``window``; an explicit value still wins (docs/method.md §1.5)."""
    assert (
        load_model(_comp_cfg(models["vlm_official_order"], "none")).vit.config.pos_embed_order == "official"
    )
    assert load_model(_comp_cfg(models["vlm"], "none")).vit.config.pos_embed_order == "window"
    forced = _comp_cfg(models["vlm_official_order"], "none", "model.pos_embed_order=window")
    assert load_model(forced).vit.config.pos_embed_order == "window"
    forced = _comp_cfg(models["vlm"], "none", "model.pos_embed_order=official")
    assert load_model(forced).vit.config.pos_embed_order == "official"
    cfg, _ = load_recipe(
        "tiny/comp_stage1", [f"model.vision={models['hf_vit']}", f"model.llm={models['llm']}"]
    )
    assert cfg.model.pos_embed_order is None and load_model(cfg).vit.config.pos_embed_order == "window"


def test_moca_hub_init_offline_names_the_installed_cli(monkeypatch, tmp_path) -> None:
    from huggingface_hub import constants

    from cmpt.hub import HubOfflineError, download_command
    from cmpt.recipes.moca import load_backbone_for

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    repo = "cmpt-test-nobody/no-such-vl"
    cfg, _ = load_recipe("tiny/moca_cpt", [f"model.init={repo}"])
    with pytest.raises(HubOfflineError) as err:
        load_backbone_for(cfg)
    msg = str(err.value)
    assert "\n" not in msg and download_command(repo) in msg and "HF_HUB_OFFLINE" in msg
    assert "model.init" in msg


def test_native_vit_skeleton_reads_only_the_config(models, tmp_path) -> None:
    eager = NativeViT.from_pretrained(models["vit"], rope=True)
    meta = NativeViT.from_pretrained(_unreadable(models["vit"], tmp_path / "vit"), rope=True, weights=False)
    _assert_skeleton_of(meta, eager)
    assert meta.config == eager.config and meta.loaded_from == tmp_path / "vit"


@pytest.mark.parametrize("family", ["dinov2", "siglip", "aimv2"])
def test_hf_vision_checkpoint_skeleton(family, tmp_path) -> None:
    """A Hugging Face vision checkpoint (stage I's ``model.vision``): the HF tower is built from its
    config on meta and converted by shape, with the CoMP tower's overrides (SigLIP drops its final norm)."""
    from cmpt.vision.convert import comp_tower_overrides

    src = save_hf_vision(family, tmp_path / "hf")
    tower = comp_tower_overrides(src)
    eager = NativeViT.from_hf(src, rope=True, **tower)
    meta = NativeViT.from_hf(_unreadable(src, tmp_path / "x"), rope=True, weights=False, **tower)
    _assert_skeleton_of(meta, eager)
    assert meta.config == eager.config


def test_stage1_from_hf_vision_reads_no_weights_on_fsdp_ranks_above_0(models, monkeypatch, tmp_path) -> None:
    _as_rank(monkeypatch, 1)
    vision, llm = _unreadable(models["hf_vit"], tmp_path / "v"), _unreadable(models["llm"], tmp_path / "l")
    cfg, _ = load_recipe(
        "tiny/comp_stage1", [f"model.vision={vision}", f"model.llm={llm}", "train.dist=fsdp"]
    )
    assert {p.is_meta for p in load_model(cfg).parameters()} == {True}


@pytest.mark.parametrize("init, order", [("vlm", "window"), ("vlm_official_order", "official")])
def test_the_resolved_order_is_what_the_run_records(models, init, order) -> None:
    """The run's config (compared on resume) holds the order trained, not "unset": a run saved with
    ``window`` before the key could be unset resumes, and a release checkpoint records ``official``."""
    from cmpt.recipes.comp import CompTask
    from cmpt.train.config_diff import diff_configs

    cfg = _comp_cfg(models[init], "none")
    assert cfg.model.pos_embed_order is None
    CompTask(cfg)
    assert cfg.model.pos_embed_order == order
    assert diff_configs({"model": {"pos_embed_order": "window"}}, {"model": {"pos_embed_order": order}}) == (
        {} if order == "window" else {"model.pos_embed_order": ["window", "official"]}
    )
