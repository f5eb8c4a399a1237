"""The lmms-eval model classes, offline with stub requests (docs/method.md §5; lmms-eval not needed).

The log-likelihood numbers are checked against an independent computation (:func:`direct_scores`).
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

import cmpt.eval.lmms_eval_plugin as plugin
from cmpt.eval.likelihood import continuation_logprobs
from cmpt.eval.lmms_eval_plugin import CmptChatLMMS, CmptLMMS, chat_request, cut_at_stop
from cmpt.vlm.chat import render_prompt
from cmpt.vlm.packed_sdpa import standard_attention

TASK, SPLIT = "chartqa", "test"


def build_vlm_dir(root: Path) -> Path:
    """A saved tiny random VLM (NativeViT 2 layers, tiny Qwen2-style LM, processor up to 112²)."""
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
    return vlm.save_pretrained(root / "vlm")


def direct_scores(
    model, processor, images, context: str, continuation: str
) -> tuple[float, bool, torch.Tensor]:
    """``(sum log p(continuation), is_greedy, logits)`` computed independently of cmpt's scoring:
    one sequence at a time through the Hugging Face model's own forward and LM head (standard
    attention, no packing), log-softmax in float64 at the positions before each continuation token."""
    vision, n_tokens = None, []
    if images:
        packed = processor(images)
        vision = model.encode_images(packed.patches, packed.grid_hw)
        n_tokens = [int(h) * int(w) // 4 for h, w in packed.grid_hw.tolist()]
    prompt = render_prompt(context, model.tokenizer, n_tokens)
    target = torch.tensor(
        model.tokenizer(continuation, add_special_tokens=False)["input_ids"], dtype=torch.long
    )
    ids = torch.cat([prompt, target])[None]
    with torch.no_grad(), standard_attention(model.body):
        logits = model.llm(inputs_embeds=model.embed_inputs(ids, vision)).logits[0].double()
    logprobs = logits.log_softmax(-1)[len(prompt) - 1 : -1]
    picked = logprobs.gather(1, target[:, None])[:, 0]
    return float(picked.sum()), bool((logprobs.argmax(-1) == target).all()), logits


@pytest.fixture(scope="module")
def vlm_dir(tmp_path_factory):
    return build_vlm_dir(tmp_path_factory.mktemp("lmms"))


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


def doc_to_target(doc):
    return " " + doc["question"].split()[0].lower()


def ll_request(doc_id: int, continuation, context: str = "What colour is it?"):
    return SimpleNamespace(args=(context, continuation, doc_to_visual, doc_id, TASK, SPLIT))


def test_loglikelihood_matches_direct_computation(lm):
    """Negative log-likelihood of each continuation = -(sum of log-softmax at its positions),
    computed independently; is_greedy agrees; answers in request order, batched by 2."""
    reqs = [
        ll_request(0, " red"),
        ll_request(0, " blue"),  # same document: images shared
        ll_request(1, " the left bar is taller than the right one"),
        ll_request(2, " yes"),  # no image
        ll_request(1, doc_to_target),  # continuation from doc_to_target
        ll_request(0, " red", context="<image>\nWhat colour is it?"),  # placeholder removed
        SimpleNamespace(args=("", " red")),  # lmms-eval's unconditional (context-free) request
    ]
    out = lm.loglikelihood(reqs)
    assert len(out) == len(reqs)
    for req, (nll, greedy) in zip(reqs, out):
        context, target = req.args[0], req.args[1]
        images = None
        if len(req.args) == 6:
            doc = lm.task_dict[TASK][SPLIT][req.args[3]]
            images = doc_to_visual(doc) or None
            target = target if isinstance(target, str) else target(doc)
        context = context.replace("<image>", "").strip()
        logprob, is_greedy, _ = direct_scores(lm.model, lm.processor, images, context, target.lstrip())
        assert isinstance(nll, float) and isinstance(greedy, bool)
        assert nll == pytest.approx(-logprob, abs=1e-4) and nll > 0
        assert greedy == is_greedy
    assert out[0] == out[5]  # an <image> placeholder changes nothing: the images go first
    assert out[0] != out[1]


def test_continuation_logprobs_batching_greedy_and_empty(lm):
    model, proc = lm.model, lm.processor
    red, blue = Image.new("RGB", (90, 60), "red"), Image.new("RGB", (40, 120), "blue")
    items = [
        ([red], "What colour?", "red"),
        (None, "Text only?", "yes it is"),
        ([red, blue], "Which one is taller?", "the blue one on the right"),
        (red, "Colour?", "red"),  # a single image, not in a list
        (None, "Nothing?", ""),  # empty continuation: (0.0, True), no forward
    ]
    ref = continuation_logprobs(model, items, proc, batch_size=1)
    assert ref[4] == (0.0, True)
    for bs in (2, 3, 8):
        got = continuation_logprobs(model, items, proc, batch_size=bs)
        assert [g for _, g in got] == [g for _, g in ref]
        assert [s for s, _ in got] == pytest.approx([s for s, _ in ref], abs=1e-5)
    order = [2, 0, 4, 3, 1]
    permuted = continuation_logprobs(model, [items[i] for i in order], proc, batch_size=2)
    assert [s for s, _ in permuted] == pytest.approx([ref[i][0] for i in order], abs=1e-5)
    for (images, context, cont), (score, _) in zip(items[:4], ref):
        assert score == pytest.approx(direct_scores(model, proc, images, context, cont)[0], abs=1e-4)

    # the greedy continuation (arg-max token by token, computed directly) is flagged greedy
    ids: list[int] = []
    for _ in range(3):
        text = model.tokenizer.decode(ids)
        logits = direct_scores(model, proc, [red], "What colour?", text)[2]
        ids.append(int(logits[-1].argmax()))
    greedy_text = model.tokenizer.decode(ids)
    assert model.tokenizer(greedy_text, add_special_tokens=False)["input_ids"] == ids
    ((_, is_greedy),) = continuation_logprobs(model, [([red], "What colour?", greedy_text)], proc)
    assert is_greedy
    other = model.tokenizer.decode([*ids[:-1], (ids[-1] + 1) % 300])
    ((_, is_greedy),) = continuation_logprobs(model, [([red], "What colour?", other)], proc)
    assert not is_greedy
    with pytest.raises(ValueError, match="batch_size"):
        continuation_logprobs(model, items, proc, batch_size=0)


def test_chat_request_layout():
    red = Image.new("RGB", (8, 8), "red")
    msgs = [
        {"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
        {"role": "user", "content": [{"type": "image", "url": red}, {"type": "text", "text": "Colour?"}]},
        {"role": "user", "content": "And the shape?"},
    ]
    assert chat_request(msgs) == ([red], "<image>\nColour?\nAnd the shape?", "Be brief.")
    assert chat_request([{"role": "user", "content": "Hi"}]) == ([], "Hi", None)
    with pytest.raises(NotImplementedError, match=r"doc 7.*'assistant'"):
        chat_request([*msgs, {"role": "assistant", "content": "Red."}], "doc 7")
    with pytest.raises(NotImplementedError, match="video"):
        chat_request([{"role": "user", "content": [{"type": "video", "url": "a.mp4"}]}])
    with pytest.raises(NotImplementedError, match="video"):
        chat_request([{"role": "user", "content": [{"type": "image", "url": "clip.mp4"}]}])


def test_chat_model_generate_until(lm, monkeypatch):
    chat = CmptChatLMMS(pretrained=lm.model, batch_size=4, system_prompt="Default system.")
    assert chat.is_simple is False and CmptLMMS.is_simple is True
    chat.task_dict = lm.task_dict
    rec = Recorder(None, canned="Red.\nMore")
    monkeypatch.setattr(lm.model, "generate_batch", rec)

    def doc_to_messages(doc):
        content = [{"type": "image", "url": doc["image"]}] if doc["image"] is not None else []
        return [{"role": "user", "content": [*content, {"type": "text", "text": doc["question"]}]}]

    def with_system(doc):
        return [{"role": "system", "content": "Own system."}, *doc_to_messages(doc)]

    gen = {"until": ["\n"], "max_new_tokens": 4}
    reqs = [
        SimpleNamespace(args=("ctx", fn, gen, doc_id, TASK, SPLIT))
        for fn, doc_id in ((doc_to_messages, 0), (doc_to_messages, 2), (with_system, 1))
    ]
    assert chat.generate_until(reqs) == ["Red."] * 3
    (items, kw), (items2, kw2) = rec.calls  # the system turn splits the batch
    assert kw["system"] == "Default system." and kw2["system"] == "Own system."
    assert items[0][0] == [lm.task_dict[TASK][SPLIT][0]["image"]] and items[0][1] == "<image>\nWhat colour?"
    assert items[1] == (None, "Text only?") and items2[0][1] == "<image>\nWhich bar?"


def test_model_args_and_properties(lm, vlm_dir):
    assert lm.batch_size == 2 and lm.rank == 0 and lm.world_size == 1 and lm.device == torch.device("cpu")
    assert lm.tokenizer is lm.model.tokenizer
    again = CmptLMMS(pretrained=lm.model, batch_size="auto", max_batch_size=None)  # a loaded model works too
    assert again.batch_size == 1 and again.processor.max_pixels == 112 * 112
    with pytest.raises(ValueError, match="dtype"):
        CmptLMMS(pretrained=str(vlm_dir), dtype="int8")


def test_imports_without_lmms_eval(monkeypatch):
    """The module must import when lmms-eval is absent (optional dependency)."""
    names = {"lmms_eval", "lmms_eval.api", "lmms_eval.api.model", "lmms_eval.models.registry_v2"}
    for name in names | {m for m in sys.modules if m.startswith("lmms_eval")}:
        monkeypatch.setitem(sys.modules, name, None)  # `import lmms_eval...` now raises ImportError
    fresh = importlib.reload(plugin)
    try:
        assert fresh.HAS_LMMS_EVAL is False and fresh.CmptLMMS.__mro__[1] is object
        assert fresh.CmptLMMS.is_simple is True and fresh.CmptChatLMMS.is_simple is False
        assert type(fresh._answer(1.5, True)) is tuple  # plain pairs without lmms-eval
        with pytest.raises(ImportError):
            fresh.lmms_eval_manifest()
    finally:
        monkeypatch.undo()
        importlib.reload(plugin)
