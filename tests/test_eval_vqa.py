"""VQA evaluation, caption loss and the resolution sweep (docs/method.md §5)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from PIL import Image

from cmpt.demo.synthetic import generate
from cmpt.eval.resolution import parse_pixels, resolution_sweep
from cmpt.eval.vqa import (
    CHARTQA_SUFFIX,
    SHORT_ANSWER_SUFFIX,
    caption_loss,
    evaluate_vqa,
    route_metric,
    score_answer,
    vqa_questions,
)
from cmpt.vision.processor import ImageProcessor


class FakeVLM:
    """``generate_batch`` answers from an (image size, question) → answer table, else ``wrong``."""

    def __init__(self, answers: dict | None = None, wrong: str = "zzzz") -> None:
        self.answers, self.wrong = answers or {}, wrong
        self.processor = ImageProcessor(14, 2, min_pixels=28 * 28, max_pixels=112 * 112)
        self.calls: list[dict] = []

    def generate_batch(self, items, *, processor=None, max_new_tokens=64, system=None):
        self.calls.append({"items": items, "processor": processor, "max_new_tokens": max_new_tokens})
        out = []
        for images, prompt in items:
            assert images and all(isinstance(im, Image.Image) for im in images)
            key = (images[0].size, prompt.split("\n")[0])
            out.append(" " + self.answers.get(key, self.wrong) + "\n")  # whitespace is stripped
        return out


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("vqa")
    charts = generate("charts", 2, root / "charts", split="val")
    docs = generate("docs", 2, root / "docs", split="val")
    return charts, docs


def table(path) -> dict:
    """The gold answers of a synthetic split, keyed like :class:`FakeVLM` looks them up."""
    recs = json.loads(path.read_text())
    return {
        ((r["meta"]["width"], r["meta"]["height"]), qa["q"]): qa["a"] for r in recs for qa in r["meta"]["qa"]
    }


def test_metric_routing_and_scores():
    assert route_metric("charts", "") == "relaxed_accuracy"
    assert route_metric("docs", "") == "anls"
    assert route_metric(None, "data/ChartQA/test.json") == "relaxed_accuracy"
    assert route_metric(None, "docvqa_val/val.json") == "anls"
    assert route_metric("scenes", "x/val.json") == "vqa_accuracy"
    assert route_metric("charts", "", "anls") == "anls"
    with pytest.raises(ValueError, match="metric"):
        route_metric(None, "", "bleu")
    assert score_answer("97", ["96"], "relaxed_accuracy") == 1.0  # within 5 %
    assert score_answer("12%", ["0.12"], "relaxed_accuracy") == 1.0
    assert score_answer("City Bakery", ["city  bakery"], "anls") == 1.0
    assert score_answer("two", ["2"], "vqa_accuracy") == 1.0


@pytest.mark.parametrize("kind", ["charts", "docs"])
def test_exact_answers_score_one_and_jsonl(data, kind, tmp_path):
    path = data[0] if kind == "charts" else data[1]
    model = FakeVLM(table(path))
    out = tmp_path / "pred.jsonl"
    r = evaluate_vqa(model, path, batch_size=3, max_new_tokens=7, out_jsonl=out)
    n_qa = sum(len(rec["meta"]["qa"]) for rec in json.loads(path.read_text()))
    assert r["score"] == 1.0 and r["n"] == n_qa and r["n_records"] == 2
    assert r["metric"] == ("relaxed_accuracy" if kind == "charts" else "anls")
    assert set(r["per_type"].values()) == {1.0}
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == n_qa and rows[0].keys() >= {"id", "question", "prediction", "answers", "score"}
    assert rows[0]["prediction"] == rows[0]["answers"][0]  # stripped
    assert all(c["max_new_tokens"] == 7 for c in model.calls)
    assert [len(c["items"]) for c in model.calls] == [3] * (n_qa // 3) + ([n_qa % 3] if n_qa % 3 else [])
    suffix = CHARTQA_SUFFIX if kind == "charts" else SHORT_ANSWER_SUFFIX
    assert all(prompt.endswith(suffix) for c in model.calls for _, prompt in c["items"])


def test_wrong_answers_score_zero_and_overrides(data):
    charts, docs = data
    model = FakeVLM()
    r = evaluate_vqa(model, charts, max_pixels=56 * 56, prompt_suffix="", limit=1)
    assert r["score"] == 0.0 and r["n_records"] == 1 and r["max_pixels"] == 56 * 56
    assert all(c["processor"].max_pixels == 56 * 56 for c in model.calls)
    assert all("\n" not in prompt for c in model.calls for _, prompt in c["items"])  # no suffix
    assert evaluate_vqa(FakeVLM(), docs)["score"] == 0.0
    r = evaluate_vqa(FakeVLM(table(charts)), charts, metric="vqa_accuracy")
    assert r["metric"] == "vqa_accuracy" and r["score"] == 1.0


def test_questions_from_conversation_turns(tmp_path):
    Image.new("RGB", (60, 40), "white").save(tmp_path / "a.png")
    caption_then_qa = [
        {"from": "human", "value": "<image>\nDescribe the image."},
        {"from": "gpt", "value": "A white image."},
        {"from": "human", "value": "What colour is it?"},
        {"from": "gpt", "value": "white"},
        {"from": "human", "value": "How many objects?"},
        {"from": "gpt", "value": "0"},
    ]
    single = [{"from": "human", "value": "<image>\nWhat colour is it?"}, {"from": "gpt", "value": "white"}]
    records = [
        {"id": "a", "image": "a.png", "conversations": caption_then_qa},
        {"id": "b", "image": "a.png", "conversations": single},
    ]
    path = tmp_path / "val.json"
    path.write_text(json.dumps(records))
    from cmpt.eval.features import load_records

    qs = vqa_questions(load_records(path))
    assert [(q.id, q.question, q.answers) for q in qs] == [
        ("a#0", "What colour is it?", ["white"]),
        ("a#1", "How many objects?", ["0"]),
        ("b#0", "What colour is it?", ["white"]),
    ]
    answers = {((60, 40), "What colour is it?"): "white", ((60, 40), "How many objects?"): "none"}
    r = evaluate_vqa(FakeVLM(answers), tmp_path)
    assert r["metric"] == "vqa_accuracy" and r["score"] == 1.0  # "none" normalizes to "0"


def test_resolution_sweep_writes_outputs(data, tmp_path):
    charts, _ = data
    assert parse_pixels("56*56, 3136,112*112") == [3136, 12544]
    r = resolution_sweep(FakeVLM(table(charts)), charts, [112 * 112, 56 * 56, 28 * 28], out_dir=tmp_path)
    assert [p["max_pixels"] for p in r["points"]] == [784, 3136, 12544]
    assert all(p["score"] == 1.0 for p in r["points"])
    tokens = [p["mean_vision_tokens"] for p in r["points"]]
    assert tokens[0] == 1.0 and tokens == sorted(tokens) and tokens[-1] > tokens[0]
    saved = json.loads((tmp_path / "resolution_sweep.json").read_text())
    assert [p["max_pixels"] for p in saved["points"]] == [784, 3136, 12544]
    png = tmp_path / "resolution_sweep.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and Image.open(png).size[0] > 100
    assert "| 3136 |" in (tmp_path / "resolution_sweep.md").read_text()
    assert (tmp_path / "predictions_784.jsonl").is_file()
    with pytest.raises(TypeError, match="out_jsonl"):
        resolution_sweep(FakeVLM(), charts, [784], out_dir=tmp_path, out_jsonl="x")


@pytest.fixture(scope="module")
def tiny_vlm():
    from cmpt.demo.tiny_lm import build_tiny_causal_lm, default_corpus, train_tokenizer
    from cmpt.vision.vit import NativeViT, NativeViTConfig
    from cmpt.vlm.model import VisionLanguageModel

    tok = train_tokenizer(default_corpus(300), vocab_size=400)
    torch.manual_seed(0)
    vit = NativeViT(
        NativeViTConfig(hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64, pos_grid=4)
    )
    proc = ImageProcessor(14, 2, min_pixels=28 * 28, max_pixels=56 * 56)
    return VisionLanguageModel.build(vit, build_tiny_causal_lm(tok), tok, processor=proc)


def test_tiny_vlm_end_to_end(data, tiny_vlm, tmp_path):
    charts, docs = data
    r = evaluate_vqa(tiny_vlm, docs, batch_size=4, max_new_tokens=4, out_jsonl=tmp_path / "p.jsonl")
    assert 0.0 <= r["score"] <= 1.0 and r["n"] == len((tmp_path / "p.jsonl").read_text().splitlines())
    loss = caption_loss(tiny_vlm, charts, batch_size=2)
    assert math.isfinite(loss) and loss > 0
    assert abs(loss - math.log(len(tiny_vlm.tokenizer))) < 2.0  # an untrained LM: about log(vocab)
    assert tiny_vlm.training is False


def test_questions_of_conversations_without_meta():
    """Without ``meta["qa"]``: the (human, gpt) pairs, consecutive human turns joined by a newline;
    with two or more pairs the first (the dense caption) is skipped, a single pair is the question."""
    conv = [
        {"from": "human", "value": "<image>\nDescribe the chart."},
        {"from": "gpt", "value": "A bar chart."},
        {"from": "human", "value": "Which bar is largest?"},
        {"from": "human", "value": "Answer with a colour."},
        {"from": "gpt", "value": "red"},
    ]
    qs = vqa_questions([{"id": "r", "conversations": conv}])
    assert [(q.question, q.answers) for q in qs] == [
        ("Which bar is largest?\nAnswer with a colour.", ["red"])
    ]
    single = vqa_questions([{"id": "s", "conversations": conv[:2]}])
    assert [(q.question, q.answers) for q in single] == [("Describe the chart.", ["A bar chart."])]


def test_relaxed_accuracy_takes_the_best_gold_answer():
    assert score_answer("10", ["12", "10"], "relaxed_accuracy") == 1.0
    assert score_answer("10", ["12", "20"], "relaxed_accuracy") == 0.0
