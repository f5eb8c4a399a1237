"""Data checker and bad-sample handling on a corpus of broken inputs (docs/method.md §4)."""

from __future__ import annotations

import json
import os

import pytest
from PIL import Image

from broken_corpus import build_broken_corpus, build_clean_corpus, conv, tiny_processor, tiny_tokenizer
from cmpt.data.batching import BatchLoader, TokenBudgetBatcher
from cmpt.data.check import check_dataset, data_check_main
from cmpt.data.llava_source import LlavaSource
from cmpt.data.pipeline import LengthIndex, SampleBuilder
from cmpt.data.sources import BadSample, resolve_image_path


@pytest.fixture(scope="module")
def broken(tmp_path_factory):
    return build_broken_corpus(tmp_path_factory.mktemp("broken"))


def _reasons(report) -> dict[str, set[str]]:
    return {sid: {p.reason for p in probs} for sid, _, probs in report.bad_samples()}


def test_check_dataset_reports_exactly_the_bad_samples(broken):
    report = check_dataset(LlavaSource(broken.path), processor=tiny_processor())
    assert _reasons(report) == broken.bad
    assert report.num_records == len(broken.good) + len(broken.bad)
    assert report.num_bad == len(broken.bad)
    assert not set(report.bad_ids) & set(broken.good)  # CMYK, 16-bit, palette, alpha are valid
    assert report.counts["unreadable_image"] == 5 and report.counts["invalid_json"] == 2
    utf8 = next(p for p in report.problems if p.reason == "invalid_json" and "UTF-8" in p.detail)
    assert "data.jsonl:16:" in utf8.detail  # reported by line number


def test_threads_and_smart_resize_args_agree(broken):
    a = check_dataset(LlavaSource(broken.path), processor_factor=28, min_pixels=784, max_pixels=12544)
    b = check_dataset(LlavaSource(broken.path), num_threads=3, processor=tiny_processor())
    assert _reasons(a) == _reasons(b) == broken.bad


def test_decompression_bomb_limit_is_respected(tmp_path, monkeypatch):
    corpus = build_clean_corpus(tmp_path, n=2)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 500)  # every test image is now "too large"
    report = check_dataset(LlavaSource(corpus.path))
    assert _reasons(report) == {"c0": {"unreadable_image"}}
    assert "decompression" in report.problems[0].detail


def test_data_check_fails_on_a_source_without_records(tmp_path):
    """An empty file passed the check (exit 0) although training stops at once on it."""
    (tmp_path / "empty.json").write_text("")
    lines: list[str] = []
    assert data_check_main(str(tmp_path / "empty.json"), print_fn=lines.append) == 1
    assert "no records" in lines[-1]


def test_data_check_main_writes_bad_samples(broken, tmp_path):
    out = tmp_path / "bad.jsonl"
    lines: list[str] = []
    status = data_check_main(str(broken.path), str(out), processor=tiny_processor(), print_fn=lines.append)
    assert status == 1
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert {r["id"]: set(r["reasons"]) for r in rows} == broken.bad
    assert all(isinstance(r["index"], int) for r in rows)
    assert "path_escape" in "\n".join(lines) and "17 bad" in "\n".join(lines)


def test_clean_corpus_returns_zero(tmp_path):
    corpus = build_clean_corpus(tmp_path)
    out = tmp_path / "bad.jsonl"
    assert data_check_main(str(corpus.path), str(out), print_fn=lambda *_: None) == 0
    assert out.read_text() == ""


def test_too_long_needs_a_tokenizer(tmp_path):
    corpus = build_clean_corpus(tmp_path, n=3)
    tok = tiny_tokenizer()
    src = LlavaSource(corpus.path)
    assert check_dataset(src, max_text_tokens=10).num_bad == 0  # no tokenizer: not checked
    long = check_dataset(src, tokenizer=tok, max_text_tokens=10)
    assert _reasons(long) == {sid: {"too_long"} for sid in corpus.good}
    assert check_dataset(src, tokenizer=tok, max_text_tokens=4096, processor=tiny_processor()).num_bad == 0


def test_resolve_image_path(tmp_path):
    root = tmp_path / "root"
    (root / "sub").mkdir(parents=True)
    assert resolve_image_path(str(root), "sub/../a.png") == str(root / "a.png")
    assert resolve_image_path(str(root), str(root / "sub" / "b.png")) == str(root / "sub" / "b.png")
    os.symlink(tmp_path, root / "link")  # a link out of the root: only with data.follow_symlinks
    with pytest.raises(BadSample, match="path_escape"):
        resolve_image_path(str(root), "link/x.png")
    assert resolve_image_path(str(root), "link/x.png", follow_symlinks=True) == str(root / "link" / "x.png")
    os.symlink(root / "sub", root / "inner")  # a link that stays inside the root is fine
    assert resolve_image_path(str(root), "inner/b.png") == str(root / "inner" / "b.png")
    for bad in ("../x.png", "sub/../../x.png", "/etc/passwd", str(tmp_path / "rootx" / "a.png")):
        with pytest.raises(BadSample) as e:
            resolve_image_path(str(root), bad, "s1")
        assert e.value.reason == "path_escape" and e.value.id == "s1"
    for bad in ("", 3, None, "a\x00b"):
        with pytest.raises(BadSample, match="bad_value"):
            resolve_image_path(str(root), bad)


def test_llava_json_list_ids_and_image_field(tmp_path):
    rows = [
        {"id": 7, "image": "a.png", "conversations": conv()},
        {"image": ["a.png", "b.png"], "conversations": conv(), "source": "x"},
        {"conversations": conv("Hi", "Hello")},
    ]
    path = tmp_path / "set.json"
    path.write_text(json.dumps(rows))
    src = LlavaSource(path, image_root=tmp_path / "imgs")
    assert len(src) == 3 and src.format == "json"
    assert [r.id for r in src] == ["7", "set.json:1", "set.json:2"]
    assert src[0].images == ["a.png"] and src[1].images == ["a.png", "b.png"] and src[2].images == []
    assert src[1].meta == {"source": "x"} and src[-1].index == 2
    assert src[1].image_path(1) == str(tmp_path / "imgs" / "b.png")
    path.write_text(json.dumps(rows)[:-5])
    with pytest.raises(ValueError, match="not a valid JSON list"):
        LlavaSource(path)


def test_jsonl_strict_mode_names_the_line(broken):
    with pytest.raises(ValueError, match=r"data\.jsonl:16: invalid UTF-8"):
        LlavaSource(broken.path, strict=True)
    src = LlavaSource(broken.path)
    assert [ln for _, ln, _ in src.bad_lines] == [16, 17]
    with pytest.raises(BadSample, match="invalid_json"):
        src[15]


@pytest.mark.parametrize("num_workers", [0, 2])
def test_loader_skips_and_counts_bad_samples_over_an_epoch(broken, num_workers):
    src, proc, tok = LlavaSource(broken.path), tiny_processor(), tiny_tokenizer()
    index = LengthIndex.build(src, proc, tok)
    # records whose image header (empty, html, bomb, thin, ../, absolute, missing) or structure
    # (no conversations, 2 unparseable lines) cannot be read get (0, 0), but are still batched
    assert index.num_failed == 10
    batcher = TokenBudgetBatcher(index.lengths, 48, 4096, 4, shuffle=False)
    assert batcher.oversize_skipped == 0
    builder = SampleBuilder(proc, tok, max_text_tokens=512, caption_max_tokens=32)
    loader = BatchLoader(src, builder, batcher, num_workers=num_workers)
    ids, num_bad = [], 0
    for batch in loader:
        if loader.epoch > 0:
            break
        ids += batch["sample_ids"]
        num_bad += batch["num_bad"]
        assert batch["num_samples"] == len(batch["sample_ids"]) > 0
    assert sorted(ids) == sorted(broken.good)
    assert num_bad == len(broken.bad) == loader.bad_seen - batch["num_bad"]


def test_loader_counts_but_never_aborts(broken):
    """The loader only reports: the limit is the trainer's, over all ranks (tests/test_bad_data_policy.py)."""
    src, proc, tok = LlavaSource(broken.path), tiny_processor(), tiny_tokenizer()
    batcher = TokenBudgetBatcher(LengthIndex.build(src, proc, tok).lengths, 48, 4096, 4)
    builder = SampleBuilder(proc, tok, max_text_tokens=512)
    loader = BatchLoader(src, builder, batcher)
    for _ in loader:
        if loader.epoch >= 3:
            break
    assert loader.bad_seen >= 3 * len(broken.bad) and loader.samples_seen >= 2 * len(broken.good)


def test_document_records_are_checked(tmp_path):
    """MoCa documents (docs/method.md §3): text records, counted with the same reasons."""
    (tmp_path / "img").mkdir()
    Image.new("RGB", (40, 30), "red").save(tmp_path / "img" / "a.png")
    (tmp_path / "img" / "bad.png").write_bytes(b"not an image")
    rows = [
        {"id": "ok", "text": "Intro <image> and text.", "images": ["img/a.png"]},
        {"id": "passage", "text": "Only words here."},
        {"id": "caption", "conversations": conv("<image>\nWhat?", "Red."), "image": "img/a.png"},
        {"id": "blank", "text": " "},
        {"id": "count", "text": "<image> <image>", "image": "img/a.png"},
        {"id": "missing", "text": "<image>", "images": ["img/none.png"]},
        {"id": "unreadable", "text": "<image>", "images": ["img/bad.png"]},
        {"id": "literal", "text": "a <|vision_start|> b"},
        {"id": "typed", "text": ["not", "a", "string"]},
    ]
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    report = check_dataset(LlavaSource(tmp_path / "docs.jsonl"), processor=tiny_processor())
    assert _reasons(report) == {
        "blank": {"empty_text"}, "count": {"placeholder_mismatch"}, "missing": {"missing_image"},
        "unreadable": {"unreadable_image"}, "literal": {"bad_value"}, "typed": {"bad_value"},
    }  # fmt: skip
    long = check_dataset(LlavaSource(tmp_path / "docs.jsonl"), tokenizer=tiny_tokenizer(), max_text_tokens=4)
    assert {"ok", "passage"} <= {sid for sid, reasons in _reasons(long).items() if reasons == {"too_long"}}
