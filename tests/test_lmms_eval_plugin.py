"""The lmms-eval model class, offline with stub requests (SPEC §5; lmms-eval not needed)."""

from __future__ import annotations

import importlib
import sys
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

import cmpt.eval.lmms_eval_plugin as plugin
from cmpt.eval.lmms_eval_plugin import CmptLMMS, cut_at_stop

TASK, SPLIT = "chartqa", "test"


@pytest.fixture(scope="module")
def vlm_dir(tmp_path_factory):
    from cmpt.demo.tiny_lm import build_tiny_causal_lm, default_corpus, train_tokenizer
    from cmpt.vision.processor import ImageProcessor
    from cmpt.vision.vit import NativeViT, NativeViTConfig
    from cmpt.vlm.model import VisionLanguageModel

    tok = train_tokenizer(default_corpus(300), vocab_size=400)
    torch.manual_seed(0)
    vit = NativeViT(
        NativeViTConfig(hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64, pos_grid=4)
    )
    proc = ImageProcessor(14, 2, min_pixels=28 * 28, max_pixels=112 * 112)
    vlm = VisionLanguageModel.build(vit, build_tiny_causal_lm(tok), tok, processor=proc)
    return vlm.save_pretrained(tmp_path_factory.mktemp("lmms") / "vlm")


@pytest.fixture(scope="module")
def lm(vlm_dir):
    model = CmptLMMS(pretrained=str(vlm_dir), batch_size="2", max_pixels=56 * 56, device="cpu")
    model.task_dict = {
        TASK: {
            SPLIT: {
                0: {"image": Image.new("RGB", (90, 60), "red"), "question": "What colour?"},
                1: {"image": Image.new("RGB", (40, 120), "blue"), "question": "Which bar?"},
                2: {"image": None, "question": "Text only?"},
            }
        }
    }
    return model


def doc_to_visual(doc):
    return [doc["image"].convert("RGB")] if doc["image"] is not None else []


def request(doc_id: int, gen_kwargs: dict, context: str = "Q?\nAnswer the question with a single word."):
    return SimpleNamespace(args=(context, gen_kwargs, doc_to_visual, doc_id, TASK, SPLIT))


class Recorder:
    """Wraps ``generate_batch``: records calls, optionally replaces the answers."""

    def __init__(self, inner, canned: str | None = None) -> None:
        self.inner, self.canned, self.calls = inner, canned, []

    def __call__(self, items, **kw):
        self.calls.append((items, kw))
        if self.canned is not None:
            return [self.canned for _ in items]
        return self.inner(items, **kw)


def test_generate_until_one_string_per_request(lm, monkeypatch):
    rec = Recorder(lm.model.generate_batch)
    monkeypatch.setattr(lm.model, "generate_batch", rec)
    reqs = [
        request(0, {"max_new_tokens": 3, "until": ["\n\n"]}),
        request(1, {"max_new_tokens": 3, "until": ["\n\n"]}),
        request(2, {"max_new_tokens": 3, "until": ["\n\n"]}, context="<image>\nText only?"),
        request(0, {"max_new_tokens": 5, "temperature": 0, "do_sample": False}),
    ]
    out = lm.generate_until(reqs)
    assert len(out) == 4 and all(isinstance(s, str) for s in out)
    # batches: consecutive requests with equal settings, at most batch_size=2
    assert [len(items) for items, _ in rec.calls] == [2, 1, 1]
    assert [kw["max_new_tokens"] for _, kw in rec.calls] == [3, 3, 5]
    assert all(kw["processor"].max_pixels == 56 * 56 for _, kw in rec.calls)
    images, prompt = rec.calls[0][0][0]
    assert len(images) == 1 and isinstance(images[0], Image.Image) and prompt.startswith("Q?")
    assert rec.calls[1][0][0] == (None, "Text only?")  # no visual, <image> placeholder removed
    for s in out:  # at most max_new_tokens tokens were generated
        assert len(lm.tokenizer(s, add_special_tokens=False)["input_ids"]) <= 5


def test_generate_until_respects_stop_strings(lm, monkeypatch):
    rec = Recorder(None, canned="Paris.\nQuestion: and Rome?")
    monkeypatch.setattr(lm.model, "generate_batch", rec)
    out = lm.generate_until(
        [
            request(0, {"until": ["\n"], "max_new_tokens": 16}),
            request(1, {"until": "Question:"}),
            request(1, {"until": [".", "\n"]}),
            request(1, {}),
        ]
    )
    assert out == ["Paris.", "Paris.\n", "Paris", "Paris.\nQuestion: and Rome?"]
    assert [kw["max_new_tokens"] for _, kw in rec.calls] == [16, lm.max_new_tokens, lm.max_new_tokens, 128]
    assert cut_at_stop("abc", ["", "z"]) == "abc"


def test_loglikelihood_and_multi_round_are_refused(lm):
    with pytest.raises(NotImplementedError, match="generate_until only"):
        lm.loglikelihood([request(0, {})])
    with pytest.raises(NotImplementedError):
        lm.generate_until_multi_round([request(0, {})])


def test_model_args_and_properties(lm, vlm_dir):
    assert lm.batch_size == 2 and lm.rank == 0 and lm.world_size == 1 and lm.device == torch.device("cpu")
    assert lm.tokenizer is lm.model.tokenizer
    again = CmptLMMS(pretrained=lm.model, batch_size="auto", max_batch_size=None)  # a loaded model works too
    assert again.batch_size == 1 and again.processor.max_pixels == 112 * 112
    with pytest.raises(ValueError, match="dtype"):
        CmptLMMS(pretrained=str(vlm_dir), dtype="int8")


def test_imports_without_lmms_eval(monkeypatch):
    """The module must import when lmms-eval is absent (optional dependency)."""
    monkeypatch.setitem(sys.modules, "lmms_eval", None)  # `import lmms_eval...` now raises ImportError
    monkeypatch.setitem(sys.modules, "lmms_eval.api", None)
    monkeypatch.setitem(sys.modules, "lmms_eval.api.model", None)
    monkeypatch.setitem(sys.modules, "lmms_eval.api.registry", None)
    fresh = importlib.reload(plugin)
    try:
        assert fresh.HAS_LMMS_EVAL is False and fresh.CmptLMMS.__mro__[1] is object
        assert fresh.CmptLMMS.is_simple is True
        with pytest.raises(ImportError):
            fresh.lmms_eval_manifest()
    finally:
        monkeypatch.undo()
        importlib.reload(plugin)
