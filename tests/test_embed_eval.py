"""`cmpt eval embed` (docs/method.md §3 "Evaluation", §5) on a tiny random Embedder and a hand-made
data directory: two MMEB tasks and one page-retrieval task, images generated here. The reported
P@1 / nDCG@5 must equal a direct computation from the Embedder's own vectors; tasks named after
MMEB datasets are also averaged per category and split."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cmpt.cli import main
from cmpt.embed.embedder import Embedder
from cmpt.eval import metrics
from cmpt.eval.embed import PAGE_PROMPT, embed_main, embed_table, evaluate_embed
from cmpt.eval.embed_data import load_embed_data
from vlm_fixtures import build_dirs, build_vlm

INSTR = "Represent the given text to find the matching image: "


def _png(path: Path, seed: int, size: tuple[int, int] = (56, 28)) -> str:
    rng = random.Random(seed)
    img = Image.new("RGB", size, tuple(rng.randrange(256) for _ in range(3)))
    for _ in range(20):
        img.putpixel((rng.randrange(size[0]), rng.randrange(size[1])), (255, 255, 255))
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path.name


def _write(path: Path, rows: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


T2I = [  # text query → image candidates (the positive first)
    {"qry_text": INSTR + "a red square", "qry_img_path": None, "tgt_img_path": ["img/0.png", "img/1.png"]},
    {"qry_text": INSTR + "two blue dots", "tgt_text": ["", ""], "tgt_img_path": ["img/1.png", "img/2.png"]},
    # a duplicate of the positive among the candidates ties with it exactly → correct
    {"qry_text": INSTR + "green", "tgt_img_path": ["img/2.png", "img/0.png", "img/2.png"]},
    {
        "qry_text": INSTR + "a chart",
        "qry_img_path": "",
        "tgt_img_path": ["img/3.png", "img/0.png", "img/1.png"],
    },
]
I2T = [  # image (+ MMEB placeholder) query → text candidates
    {
        "qry_text": "<|image_1|>\nRepresent the given image.",
        "qry_img_path": f"img/{i}.png",
        "tgt_text": [f"caption {i}", "a dog", "the total is 12", f"caption {i + 1}"],
        "tgt_img_path": ["", None, "", ""],
    }
    for i in range(3)
]
QUERIES = [
    {"id": "q0", "text": "sales in 2020"},
    {"id": "q1", "text": "the invoice total"},
    {"id": 2, "text": "x"},
]
CORPUS = [{"id": f"p{i}", "image_path": f"pages/{i}.png"} for i in range(4)]
QRELS = [
    {"query_id": "q0", "corpus_id": "p1", "score": 1},
    {"query_id": "q0", "corpus_id": "p3", "score": 2},
    {"query_id": "q1", "corpus_id": "p0", "score": 1},
    {"query_id": "2", "corpus_id": "p2", "score": 0},  # no positive → left out of nDCG
]


def make_data(root: Path) -> Path:
    for i in range(4):
        _png(root / "img" / f"{i}.png", i)
        _png(root / "vidore" / "pages" / f"{i}.png", 10 + i, (28, 56))
    _write(root / "t2i.jsonl", [{"task": "t2i", **r} for r in T2I])
    _write(root / "i2t.jsonl", [{"task": "i2t", **r} for r in I2T])
    _write(root / "vidore" / "queries.jsonl", QUERIES)
    _write(root / "vidore" / "corpus.jsonl", CORPUS)
    _write(root / "vidore" / "qrels.jsonl", QRELS)
    (root / "notes").mkdir()  # a folder without task files is ignored
    return root


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    return build_dirs(tmp_path_factory.mktemp("embed_eval"))


@pytest.fixture(scope="module")
def emb(dirs):
    return Embedder(build_vlm(dirs, "qwen2"), batch_tokens=96)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_data(tmp_path_factory.mktemp("embed_data"))


def _direct_p1(emb: Embedder, root: Path, rows: list[dict]) -> float:
    """P@1 by hand: every input encoded on its own, cosine, argmax (first maximum)."""
    hits = []
    for r in rows:
        qt = r["qry_text"].replace("<|image_1|>", "<image>")
        qi = root / r["qry_img_path"] if r.get("qry_img_path") else None
        q = emb.encode([qt], [qi])[0]
        n = len(r.get("tgt_img_path") or r["tgt_text"])
        texts = [(r.get("tgt_text") or [None] * n)[i] or None for i in range(n)]
        imgs = [root / p if p else None for p in (r.get("tgt_img_path") or [None] * n)]
        c = torch.cat([emb.encode([t], [im]) for t, im in zip(texts, imgs)])
        s = (torch.nn.functional.normalize(c, dim=-1) @ torch.nn.functional.normalize(q, dim=-1)).numpy()
        hits.append(float(s[0] >= s.max()))
    return float(np.mean(hits))


def test_scores_equal_a_direct_computation(emb, data):
    res = evaluate_embed(emb, data)
    assert set(res["mmeb"]) == {"t2i", "i2t"} and set(res["pages"]) == {"vidore"}
    t2i, i2t = _direct_p1(emb, data, T2I), _direct_p1(emb, data, I2T)
    assert res["mmeb"]["t2i"]["precision_at_1"] == pytest.approx(t2i)
    assert res["mmeb"]["i2t"]["precision_at_1"] == pytest.approx(i2t)
    assert res["mmeb_mean_precision_at_1"] == pytest.approx((t2i + i2t) / 2)
    assert res["mmeb_unknown_tasks"] == ["i2t", "t2i"]  # no MMEB dataset name: the overall mean only
    groups = [*res["mmeb_category_means"].values(), *res["mmeb_split_means"].values()]
    assert len(groups) == 6 and all(g["n_present"] == 0 for g in groups)
    # pages: raw query text (no instruction), pages as the document prompt, dot product
    q = emb.encode([r["text"] for r in QUERIES])
    p = emb.encode([PAGE_PROMPT] * 4, [data / "vidore" / c["image_path"] for c in CORPUS])
    rel = np.array([[0, 1, 0, 2], [1, 0, 0, 0]])
    expected = metrics.ndcg_at_k((q[:2] @ p.T).numpy(), rel, k=5)
    page = res["pages"]["vidore"]
    assert page["ndcg_at_5"] == pytest.approx(expected)
    assert res["pages_mean_ndcg_at_5"] == pytest.approx(expected)
    assert (page["n_queries"], page["n_scored"], page["n_pages"]) == (3, 2, 4)
    assert res["skipped"] == 0 and res["n_embedded"] < res["n_inputs"]


def test_every_distinct_input_once_with_the_prompts(emb, data):
    calls: list[tuple[list, list]] = []

    class Spy:
        def encode(self, texts, images, **kw):
            calls.append((list(texts), list(images)))
            return emb.encode(texts, images, **kw)

    res = evaluate_embed(Spy(), data)
    seen = [(t, None if i is None else str(i)) for texts, imgs in calls for t, i in zip(texts, imgs)]
    assert len(seen) == len(set(seen)) == res["n_embedded"]
    page_inputs = {Path(i).name for t, i in seen if t == PAGE_PROMPT}
    assert page_inputs == {"0.png", "1.png", "2.png", "3.png"}
    assert ("sales in 2020", None) in seen  # the raw query text, no instruction
    assert ("<image>\nRepresent the given image.", str(data / "img" / "0.png")) in seen
    assert (None, str(data / "img" / "2.png")) in seen  # an image-only candidate, no prompt added


def test_limit_keeps_the_first_queries(emb, data):
    ds = load_embed_data(data, limit=1)
    assert [len(t.queries) for t in ds.mmeb] == [1, 1] and len(ds.pages[0].queries) == 1
    assert len(ds.pages[0].pages) == 4 and ds.pages[0].qrels == [{1: 1.0, 3: 2.0}]


def test_cli_writes_json_markdown_png(emb, data, tmp_path, capsys):
    emb.save_pretrained(tmp_path / "model")
    out = tmp_path / "out"
    argv = ["eval", "embed", "--model", str(tmp_path / "model"), "--data", str(data), "--out", str(out)]
    assert main([*argv, "--batch-tokens", "128", "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert "| t2i | MMEB | P@1 |" in printed and "| vidore | pages | nDCG@5 |" in printed
    for name in ("embed_results.json", "embed_results.md", "embed_results.png"):
        assert (out / name).stat().st_size > 0
    saved = json.loads((out / "embed_results.json").read_text())
    direct = evaluate_embed(emb, data)
    assert saved["mmeb"]["t2i"]["precision_at_1"] == pytest.approx(direct["mmeb"]["t2i"]["precision_at_1"])
    assert saved["pages"]["vidore"]["ndcg_at_5"] == pytest.approx(direct["pages"]["vidore"]["ndcg_at_5"])
    md = (out / "embed_results.md").read_text()
    assert "mean (2 MMEB tasks)" in md and "Classification mean" not in md
    assert "outside MMEB's 36 datasets (in the overall mean only): i2t, t2i" in md


def test_mmeb_category_and_split_means(emb, tmp_path):
    """Tasks named after MMEB datasets: VOC2007 (Classification, IND), ImageNet-R (Classification,
    OOD), GQA (VQA, OOD); t2i is unknown. Each mean is over the tasks present, without weights."""
    root = make_data(tmp_path / "d")
    (root / "i2t.jsonl").rename(root / "ImageNet-R.jsonl")
    _write(root / "VOC2007.jsonl", T2I)
    _write(root / "GQA.jsonl", T2I[:2])
    res = evaluate_embed(emb, root)
    p1 = {name: r["precision_at_1"] for name, r in res["mmeb"].items()}
    assert list(p1) == ["GQA", "ImageNet-R", "VOC2007", "t2i"]
    assert p1["VOC2007"] == pytest.approx(_direct_p1(emb, root, T2I))
    assert p1["ImageNet-R"] == pytest.approx(_direct_p1(emb, root, I2T))
    assert p1["GQA"] == pytest.approx(_direct_p1(emb, root, T2I[:2]))
    assert res["mmeb_mean_precision_at_1"] == pytest.approx(sum(p1.values()) / 4)  # unknown t2i included
    cat, split = res["mmeb_category_means"], res["mmeb_split_means"]
    assert cat["Classification"]["mean_precision_at_1"] == pytest.approx(
        (p1["VOC2007"] + p1["ImageNet-R"]) / 2
    )
    assert cat["VQA"]["mean_precision_at_1"] == pytest.approx(p1["GQA"])
    assert [(cat[c]["n_present"], cat[c]["n_datasets"]) for c in cat] == [(2, 10), (1, 10), (0, 12), (0, 4)]
    assert split["IND"]["mean_precision_at_1"] == pytest.approx(p1["VOC2007"])
    assert split["OOD"]["mean_precision_at_1"] == pytest.approx((p1["ImageNet-R"] + p1["GQA"]) / 2)
    assert [(g["n_present"], g["n_datasets"]) for g in split.values()] == [(1, 20), (2, 16)]
    assert res["mmeb_unknown_tasks"] == ["t2i"]
    table = embed_table(res)
    mean = cat["Classification"]["mean_precision_at_1"]
    assert f"| **Classification mean (2/10 datasets)** | MMEB | P@1 | **{mean:.4f}** |" in table
    assert "| **IND mean (1/20 datasets)** |" in table and "| **OOD mean (2/16 datasets)** |" in table
    assert "Retrieval mean" not in table and "(in the overall mean only): t2i\n" in table


def _broken(root: Path) -> Path:
    make_data(root)
    rows = [json.dumps({"task": "t2i", **r}) for r in T2I]
    rows.insert(1, '{"qry_text": "unterminated"')  # line 2: malformed
    rows.append(json.dumps({"qry_text": "x", "tgt_img_path": ["img/missing.png"]}))  # line 6
    rows.append(json.dumps({"qry_text": "y", "tgt_img_path": ["../outside.png"]}))  # line 7
    _write(root / "t2i.jsonl", rows)
    _write(root / "vidore" / "qrels.jsonl", [*QRELS, {"query_id": "q0", "corpus_id": "nope", "score": 1}])
    _write(root / "vidore" / "corpus.jsonl", [*CORPUS, {"id": "p1", "image_path": "pages/0.png"}])  # dup
    (root / "img" / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    _write(root / "i2t.jsonl", [{**I2T[0], "qry_img_path": "img/bad.png"}, I2T[1]])
    return root


def test_bad_records_fail_naming_file_and_line_or_are_skipped(emb, data, tmp_path, capsys):
    root = _broken(tmp_path / "d")
    with pytest.raises(ValueError, match=r"i2t\.jsonl:1: unreadable_image.*--skip-bad"):
        load_embed_data(root)
    (root / "i2t.jsonl").unlink()
    with pytest.raises(ValueError, match=r"t2i\.jsonl:2: invalid_json"):
        load_embed_data(root)
    res = evaluate_embed(emb, _broken(tmp_path / "d2"), skip_bad=True)
    reasons = {(Path(b["file"]).name, b["line"]): b["reason"] for b in res["bad"]}
    assert reasons == {
        ("i2t.jsonl", 1): "unreadable_image",
        ("t2i.jsonl", 2): "invalid_json",
        ("t2i.jsonl", 6): "missing_image",
        ("t2i.jsonl", 7): "path_escape",
        ("qrels.jsonl", 5): "bad_value",
        ("corpus.jsonl", 5): "bad_value",  # a duplicate id: the first page p1 and its qrels stay
    }
    assert res["skipped"] == 6 and res["mmeb"]["t2i"]["skipped"] == 3
    clean = evaluate_embed(emb, data)["pages"]["vidore"]
    assert res["pages"]["vidore"]["ndcg_at_5"] == pytest.approx(clean["ndcg_at_5"])
    assert res["pages"]["vidore"]["n_pages"] == 4 and res["pages"]["vidore"]["skipped"] == 2
    assert res["mmeb"]["t2i"]["n_queries"] == 4 and res["mmeb"]["i2t"]["n_queries"] == 1
    # the command line: one error line naming the file and line, exit status 2
    argv = ["eval", "embed", "--model", "unused", "--data", str(tmp_path / "d")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "t2i.jsonl:2: invalid_json" in err and "Traceback" not in err


def test_empty_or_incomplete_directories_are_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="holds no task"):
        load_embed_data(tmp_path)
    _write(tmp_path / "pages" / "queries.jsonl", QUERIES)
    with pytest.raises(FileNotFoundError, match="not all of"):
        load_embed_data(tmp_path)
    with pytest.raises(ValueError, match="placeholder_mismatch"):
        _write(tmp_path / "x.jsonl", [{"qry_text": "<image> twice <image>", "tgt_text": ["a"]}])
        (tmp_path / "pages" / "queries.jsonl").unlink()
        load_embed_data(tmp_path)


def test_hugging_face_qwen2_5_vl_directory(data, tmp_path):
    from test_qwen_vl_backbone import build_checkpoint

    ckpt = build_checkpoint("qwen2_5_vl", tmp_path / "qwen")
    res = embed_main(ckpt, data, out=tmp_path / "out", limit=2, device="cpu")
    assert res["mmeb"]["t2i"]["n_queries"] == 2 and (tmp_path / "out" / "embed_results.png").is_file()
    q = Embedder.from_pretrained(ckpt)
    expected = _direct_p1(q, data, T2I[:2])
    assert res["mmeb"]["t2i"]["precision_at_1"] == pytest.approx(expected)
    assert 0.0 <= res["pages_mean_ndcg_at_5"] <= 1.0


def test_images_are_decoded_once_each_by_threads(data, monkeypatch):
    """Clean data: one pass over the records, every distinct image decoded once, in the preparation
    threads (docs/method.md §7); the same result as decoding each in turn."""
    import threading

    import cmpt.eval.embed_data as embed_data

    seen, real = [], embed_data.load_image

    def spy(path, *args):
        seen.append((path, threading.current_thread().name))
        return real(path, *args)

    monkeypatch.setattr(embed_data, "load_image", spy)
    ds = load_embed_data(data)
    paths = [p for p, _ in seen]
    assert sorted(paths) == sorted({p for _, p in ds.keys if p is not None}) and len(set(paths)) == len(paths)
    assert all(name.startswith("cmpt-prefetch") for _, name in seen)
    monkeypatch.setattr(embed_data, "ordered_map", lambda fn, items, **kw: map(fn, items))  # in turn
    serial = load_embed_data(data)
    assert (serial.keys, serial.mmeb, serial.pages, serial.bad) == (ds.keys, ds.mmeb, ds.pages, ds.bad)


def test_limit_counts_queries_whose_images_decode(tmp_path, caplog):
    """An unreadable image found after the first pass: its query is skipped, logged once, and the
    limit is filled from the queries after it, as when each image was decoded in turn."""
    root = make_data(tmp_path / "d")
    (root / "img" / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    rows = [{"task": "i2t", **I2T[0], "qry_img_path": "img/bad.png"}, *({"task": "i2t", **r} for r in I2T)]
    _write(root / "i2t.jsonl", rows)
    with caplog.at_level("WARNING", logger="cmpt.eval"):
        ds = load_embed_data(root / "i2t.jsonl", limit=2, skip_bad=True)
    assert [b["line"] for b in ds.bad] == [1] and ds.bad[0]["reason"] == "unreadable_image"
    assert len(ds.mmeb[0].queries) == 2 and ds.keys[ds.mmeb[0].queries[0]][1].endswith("img/0.png")
    assert [r.getMessage().count("skipping") for r in caplog.records] == [1]
    with pytest.raises(ValueError, match=r"i2t\.jsonl:1: unreadable_image"):
        load_embed_data(root / "i2t.jsonl", limit=2)
