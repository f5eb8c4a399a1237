"""Offline MoCa data: interleaved documents and text-only passages (docs/method.md §3)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from cmpt.cli import main
from cmpt.data.check import check_dataset, data_check_main
from cmpt.data.open import open_source
from cmpt.demo.synth_documents import generate_documents, generate_passages
from cmpt.demo.synthetic import VAL_SEED_OFFSET, synth_main

N = 8


def _hashes(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}  # fmt: skip


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def docs(tmp_path_factory) -> Path:
    return generate_documents(N, tmp_path_factory.mktemp("documents"), seed=0)


def test_documents_are_deterministic_and_well_formed(docs: Path, tmp_path: Path) -> None:
    again = generate_documents(N, tmp_path / "again", seed=0)
    assert _hashes(docs.parent) == _hashes(again.parent)  # byte-identical JSONL and PNGs
    prefix = generate_documents(3, tmp_path / "prefix", seed=0)
    assert _rows(prefix) == _rows(docs)[:3]  # the first records do not depend on n
    other = _rows(generate_documents(3, tmp_path / "other", seed=1))
    assert [r["text"] for r in other] != [r["text"] for r in _rows(docs)[:3]]
    rows = _rows(docs)
    assert [r["id"] for r in rows] == [f"documents-train-{i:06d}" for i in range(N)]
    for r in rows:
        assert 1 <= len(r["images"]) <= 3 and r["text"].count("<image>") == len(r["images"])
        assert all((docs.parent / p).is_file() for p in r["images"])
        for src in r["meta"]["sources"]:  # the facts are in the text
            assert src["caption"] in r["text"]
    assert any("Figure" in r["text"] or "Exhibit" in r["text"] for r in rows)


def test_passages_are_text_only_and_deterministic(tmp_path: Path) -> None:
    a = generate_passages(N, tmp_path / "a", seed=0)
    b = generate_passages(N, tmp_path / "b", seed=0)
    assert a.read_bytes() == b.read_bytes()
    rows = _rows(a)
    assert all("images" not in r and "<image>" not in r["text"] and len(r["text"]) > 50 for r in rows)
    assert len({r["text"] for r in rows}) == N
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["train.jsonl"]


def test_generated_data_pass_the_checker(docs: Path, tmp_path: Path) -> None:
    assert data_check_main(str(docs), print_fn=lambda *_: None) == 0
    passages = generate_passages(N, tmp_path, seed=0)
    report = check_dataset(open_source(passages))
    assert report.num_records == N and report.problems == []


def test_synth_cli_writes_splits(tmp_path: Path, capsys) -> None:
    assert main(["data", "synth", "--kind", "passages", "--n", "4", "--out", str(tmp_path / "p"),
                 "--splits", "train,val"]) == 0  # fmt: skip
    summary = json.loads(capsys.readouterr().out)
    assert summary["kind"] == "passages" and summary["splits"]["val"]["seed"] == VAL_SEED_OFFSET
    assert len(_rows(Path(summary["splits"]["train"]["json"]))) == 4
    assert len(_rows(Path(summary["splits"]["val"]["json"]))) == 1
    out = synth_main("documents", 2, tmp_path / "d", seed=3, splits="train:2,val:1")
    val = _rows(Path(out["splits"]["val"]["json"]))
    assert len(val) == 1 and val[0]["id"] == "documents-val-000000"
    assert val[0]["meta"]["seed"] == 3 + VAL_SEED_OFFSET
