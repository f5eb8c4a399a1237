"""Offline retrieval data for MoCa stage 2: pairs with hard negatives and held-out MMEB / ViDoRe-style
evaluation files (docs/method.md §3)."""

from __future__ import annotations

import hashlib
import json
import time
from collections import Counter
from pathlib import Path

import pytest

from cmpt.cli import main
from cmpt.data.check import data_check_main
from cmpt.data.open import open_source
from cmpt.demo.synth_retrieval import NUM_CANDIDATES, TASKS, make_family, synth_retrieval_main
from cmpt.demo.synthetic import split_seed

N = 25


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _hashes(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}  # fmt: skip


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("retrieval")
    start = time.perf_counter()
    assert main(["data", "synth", "--kind", "retrieval", "--n", str(N), "--out", str(out)]) == 0
    assert time.perf_counter() - start < 60  # a few seconds on a free core
    return out


def test_train_pairs_pass_the_checker_and_have_hard_negatives(synth):
    rows = _rows(synth / "train.jsonl")
    assert len(rows) == N and Counter(r["task"] for r in rows) == {
        "caption2image": 6, "page_retrieval": 6, "image2class": 5, "vqa2image": 5, "question2chart": 3,
    }  # fmt: skip
    assert data_check_main(str(synth / "train.jsonl"), print_fn=lambda *_: None) == 0
    src = open_source(synth / "train.jsonl")
    assert all(src[i].is_pair for i in range(len(src)))
    for r in rows:
        negs = list(zip(r["neg_text"], r["neg_image_path"]))
        assert len(negs) == 2 and (r["pos_text"], r["pos_image_path"]) not in negs
        if r["task"] == "image2class":  # text targets: "<colour> <shape>", one attribute changed
            colour, shape = r["pos_text"].split()
            assert r["qry_image_path"] and all(p is None for p in r["neg_image_path"])
            assert [t.split()[1] == shape for t in r["neg_text"]] == [True, False]
            assert [t.split()[0] == colour for t in r["neg_text"]] == [False, True]
        elif r["task"] == "vqa2image":  # interleaved query; the unedited scene is a negative
            assert r["qry"].count("<image>") == 1 and r["qry_image_path"] in r["neg_image_path"]
        else:  # negatives: siblings of the positive (same generator, same family, other answer)
            family = Path(r["pos_image_path"]).stem.split("-")[0]
            assert all(Path(p).stem.split("-")[0] == family for p in r["neg_image_path"])
            assert r["qry_image_path"] is None
        assert (r["task"] == "page_retrieval") != r["qry"].startswith(("Find", "Represent", "Given"))


def test_eval_files_have_the_positive_first_and_are_held_out(synth):
    ev = synth / "eval"
    assert json.loads((ev / "tasks.json").read_text()) == {
        t: "vidore" if t == "page_retrieval" else "mmeb" for t in TASKS
    }
    train_images = {h for p, h in _hashes(synth / "images").items()}
    seed = split_seed(0, "test")
    for task in TASKS:
        if task == "page_retrieval":
            continue
        rows = _rows(ev / f"{task}.jsonl")
        assert len(rows) == 8
        fams = [ex for f in range(8) for ex in make_family(task, seed, f)][:8]
        for row, (q, pos, negs) in zip(rows, fams):
            assert row["task"] == task and row["qry_text"] == q["text"]
            assert len(row["tgt_text"]) == len(row["tgt_img_path"]) == NUM_CANDIDATES
            if pos["image"] is None:  # image2class: the class name first, then the hard negatives
                assert row["tgt_text"][:3] == [pos["text"], *(x["text"] for x in negs)]
                assert len(set(row["tgt_text"])) == NUM_CANDIDATES
            else:
                assert Path(row["tgt_img_path"][0]).stem == pos["name"]
                assert [Path(p).stem for p in row["tgt_img_path"][1:3]] == [x["name"] for x in negs]
                assert len(set(row["tgt_img_path"])) == NUM_CANDIDATES
                assert all((ev / p).is_file() for p in row["tgt_img_path"])
                held = {hashlib.sha256((ev / p).read_bytes()).hexdigest() for p in row["tgt_img_path"]}
                assert not held & train_images
    d = ev / "page_retrieval"
    queries, corpus, qrels = (_rows(d / f"{n}.jsonl") for n in ("queries", "corpus", "qrels"))
    assert len(queries) == len(qrels) == 8 and len(corpus) >= 8
    ids = {c["id"] for c in corpus}
    assert all((d / c["image_path"]).is_file() for c in corpus)
    assert [q["id"] for q in queries] == [r["query_id"] for r in qrels]
    assert all(r["corpus_id"] in ids and r["score"] == 1 for r in qrels)
    assert all(q["text"].startswith("What is the") for q in queries)  # bare questions, no instruction


def test_eval_data_load_in_cmpt_eval_embed(synth):
    embed_data = pytest.importorskip("cmpt.eval.embed_data")
    data = embed_data.load_embed_data(synth / "eval")
    assert sorted(t.name for t in data.mmeb) == sorted(t for t in TASKS if t != "page_retrieval")
    assert [t.name for t in data.pages] == ["page_retrieval"] and not data.bad


def test_deterministic_per_seed(tmp_path):
    tasks = ["caption2image", "image2class", "page_retrieval"]
    a = synth_retrieval_main(12, tmp_path / "a", seed=3, n_eval=4, tasks=tasks)
    synth_retrieval_main(12, tmp_path / "b", seed=3, n_eval=4, tasks=tasks)
    assert a["pairs"] == {"caption2image": 4, "page_retrieval": 4, "image2class": 4}
    assert _hashes(tmp_path / "a") == _hashes(tmp_path / "b")
    synth_retrieval_main(12, tmp_path / "c", seed=4, n_eval=4, tasks=tasks)
    assert _hashes(tmp_path / "a")["train.jsonl"] != _hashes(tmp_path / "c")["train.jsonl"]
    with pytest.raises(ValueError, match="unknown retrieval task"):
        synth_retrieval_main(4, tmp_path / "d", tasks=["nope"])
