"""Weights silently missing after a transformers upgrade are refused (docs/method.md §3 "Known failure
modes of the reference code"): a checkpoint with one tensor deleted, or one unknown tensor added, does
not load through ``cmpt.Embedder``, ``QwenVLBackbone`` or ``VisionLanguageModel`` (LLM and merger);
an unmodified checkpoint loads bit for bit, with its tied head and legacy buffers."""

from __future__ import annotations

import re
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import transformers as tf
from safetensors.torch import load_file, save_file

from cmpt.embed.embedder import Embedder
from cmpt.embed.qwen_vl import QwenVLBackbone
from cmpt.vlm.io import MERGER_WEIGHTS, CheckpointWeightsError
from cmpt.vlm.model import VisionLanguageModel
from test_qwen_vl_backbone import build_checkpoint
from vlm_fixtures import build_dirs, build_vlm

WEIGHTS = "model.safetensors"


@pytest.fixture(scope="module")
def qwen(tmp_path_factory) -> Path:
    """A tiny random Qwen2.5-VL directory (tied head: no ``lm_head.weight`` in its file)."""
    return build_checkpoint("qwen2_5_vl", tmp_path_factory.mktemp("missing") / "qwen2_5_vl")


@pytest.fixture(scope="module")
def vlm(tmp_path_factory) -> VisionLanguageModel:
    """A tiny cmpt VLM over a Qwen2 LLM with a tied head."""
    return build_vlm(build_dirs(tmp_path_factory.mktemp("missing_vlm")))


@pytest.fixture(scope="module")
def vlm_dir(vlm, tmp_path_factory) -> Path:
    """The VLM saved as an Embedder directory (a VLM directory plus ``embedder_config.json``)."""
    return Embedder(vlm).save_pretrained(tmp_path_factory.mktemp("missing_emb") / "embedder")


def edited(src: Path, dst: Path, weights: str, edit: Callable[[dict[str, torch.Tensor]], None]) -> Path:
    """A copy of the checkpoint ``src`` at ``dst`` whose safetensors file ``weights`` went through
    ``edit`` (metadata kept as transformers writes it)."""
    shutil.copytree(src, dst)
    state = load_file(str(dst / weights))
    edit(state)
    save_file(state, str(dst / weights), metadata={"format": "pt"})
    return dst


def assert_equal_states(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_unmodified_checkpoints_load_bit_for_bit(qwen, vlm, vlm_dir, tmp_path):
    assert "lm_head.weight" not in load_file(str(qwen / WEIGHTS))  # tied: absent, and legitimately so
    plain = tf.Qwen2_5_VLForConditionalGeneration.from_pretrained(str(qwen))
    assert_equal_states(Embedder.from_pretrained(qwen).backbone.hf, plain)
    bb = QwenVLBackbone.from_pretrained(qwen)
    assert_equal_states(bb.hf, plain)
    reloaded = Embedder.from_pretrained(Embedder(bb).save_pretrained(tmp_path / "qwen_emb"))
    assert_equal_states(reloaded.backbone.hf, plain)

    assert "lm_head.weight" not in load_file(str(vlm_dir / "llm" / WEIGHTS))
    assert_equal_states(VisionLanguageModel.from_pretrained(vlm_dir), vlm)
    assert_equal_states(Embedder.from_pretrained(vlm_dir).backbone, vlm)


def test_legacy_buffers_in_the_file_are_accepted(vlm, vlm_dir, tmp_path):
    """A per-layer ``rotary_emb.inv_freq`` (older transformers saved it) is recomputed, not unexpected."""
    key = "model.layers.0.self_attn.rotary_emb.inv_freq"
    d = edited(vlm_dir, tmp_path / "old", f"llm/{WEIGHTS}", lambda s: s.__setitem__(key, torch.ones(4)))
    assert_equal_states(VisionLanguageModel.from_pretrained(d), vlm)


@pytest.mark.parametrize(
    ("deleted", "reported"),
    [
        ("model.layers.0.mlp.down_proj.weight", ["model.language_model.layers.0.mlp.down_proj.weight"]),
        ("visual.blocks.0.attn.qkv.weight", ["model.visual.blocks.0.attn.qkv.weight"]),
        # the tied head's source: the head has nothing to be tied to either
        ("model.embed_tokens.weight", ["lm_head.weight", "model.language_model.embed_tokens.weight"]),
    ],
)
def test_missing_qwen_vl_tensor_is_refused(qwen, tmp_path, deleted, reported):
    d = edited(qwen, tmp_path / "cut", WEIGHTS, lambda s: s.pop(deleted))
    for load in (Embedder.from_pretrained, QwenVLBackbone.from_pretrained):
        with pytest.raises(
            CheckpointWeightsError, match=rf"{len(reported)} missing .*{re.escape(reported[0])}"
        ) as e:
            load(d)
        assert (e.value.source, e.value.missing, e.value.unexpected) == (str(d), reported, [])
        assert str(d) in str(e.value) and "convert it" in str(e.value)


def test_unknown_qwen_vl_tensor_is_refused(qwen, tmp_path):
    extra = "model.layers.0.mlp.extra.weight"
    d = edited(qwen, tmp_path / "extra", WEIGHTS, lambda s: s.__setitem__(extra, torch.zeros(3)))
    with pytest.raises(CheckpointWeightsError, match=r"1 unexpected .*layers\.0\.mlp\.extra\.weight") as e:
        Embedder.from_pretrained(d)
    assert e.value.missing == [] and e.value.unexpected == ["model.language_model.layers.0.mlp.extra.weight"]


def test_missing_or_unknown_llm_tensor_is_refused(vlm_dir, tmp_path):
    deleted = "model.layers.1.self_attn.q_proj.weight"
    d = edited(vlm_dir, tmp_path / "cut", f"llm/{WEIGHTS}", lambda s: s.pop(deleted))
    for load in (VisionLanguageModel.from_pretrained, Embedder.from_pretrained):
        with pytest.raises(CheckpointWeightsError, match=rf"{re.escape(str(d / 'llm'))}: .*1 missing") as e:
            load(d)
        assert e.value.missing == [deleted] and e.value.unexpected == []

    extra = "model.layers.0.extra.weight"
    d = edited(vlm_dir, tmp_path / "extra", f"llm/{WEIGHTS}", lambda s: s.__setitem__(extra, torch.zeros(3)))
    with pytest.raises(CheckpointWeightsError) as e:
        VisionLanguageModel.from_pretrained(d)
    assert e.value.missing == [] and e.value.unexpected == [extra]


def test_missing_or_unknown_merger_tensor_is_refused(vlm_dir, tmp_path):
    d = edited(vlm_dir, tmp_path / "cut", MERGER_WEIGHTS, lambda s: s.pop("fc1.bias"))
    with pytest.raises(CheckpointWeightsError, match=rf"{re.escape(MERGER_WEIGHTS)}: .*PatchMerger") as e:
        Embedder.from_pretrained(d)
    assert e.value.source == str(d / MERGER_WEIGHTS) and e.value.missing == ["fc1.bias"]

    d = edited(
        vlm_dir, tmp_path / "extra", MERGER_WEIGHTS, lambda s: s.__setitem__("fc3.bias", torch.zeros(3))
    )
    with pytest.raises(CheckpointWeightsError) as e:
        VisionLanguageModel.from_pretrained(d)
    assert e.value.missing == [] and e.value.unexpected == ["fc3.bias"]
