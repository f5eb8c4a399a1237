"""Symbolic links out of the image root (docs/method.md §4 "Bad samples"): an image path that stays
inside the root lexically but leads through a link to a file elsewhere is a ``path_escape`` bad
sample — in the checker and in the loader — unless ``data.follow_symlinks: true``."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: broken_corpus

import cmpt.data.sources as sources
from broken_corpus import conv, noise, tiny_processor, tiny_tokenizer
from cmpt.data.check import check_dataset
from cmpt.data.config import DataConfig
from cmpt.data.llava_source import LlavaSource
from cmpt.data.loader import build_loader


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    """Images under ``root/img``: two real ones, a link to a file outside the root and a link to
    a directory outside it; one record per image."""
    root, outside = tmp_path / "root", tmp_path / "outside"
    (root / "img").mkdir(parents=True)
    outside.mkdir()
    for i in range(2):
        noise(40, 30, seed=i).save(root / "img" / f"{i}.png")
    noise(40, 30, seed=9).save(outside / "secret.png")
    os.symlink(outside / "secret.png", root / "img" / "file_link.png")
    os.symlink(outside, root / "img" / "dir_link")
    os.symlink(root / "img" / "0.png", root / "img" / "inner_link.png")  # stays inside: fine
    images = ["img/0.png", "img/1.png", "img/file_link.png", "img/dir_link/secret.png", "img/inner_link.png"]
    rows = [{"id": f"s{i}", "image": p, "conversations": conv()} for i, p in enumerate(images)]
    (root / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root / "data.jsonl"


@pytest.fixture(autouse=True)
def _restore_default():
    yield
    sources.set_follow_symlinks(False)


def test_checker_reports_links_out_of_the_root(corpus: Path) -> None:
    report = check_dataset(LlavaSource(corpus))
    bad = {p.id: p.reason for p in report.problems}
    assert bad == {"s2": "path_escape", "s3": "path_escape"}
    assert all("symbolic link" in p.detail and "follow_symlinks" in p.detail for p in report.problems)
    sources.set_follow_symlinks(True)
    assert check_dataset(LlavaSource(corpus)).num_bad == 0


@pytest.mark.parametrize("follow", [False, True])
def test_loader_follows_data_follow_symlinks(corpus: Path, follow: bool) -> None:
    assert DataConfig().follow_symlinks is False
    cfg = DataConfig(path=str(corpus), shuffle=False, vision_budget=10_000, follow_symlinks=follow)
    loader = build_loader(cfg, tiny_processor(), tiny_tokenizer())
    batch = next(iter(loader))  # the whole epoch in one micro-batch
    assert sources.FOLLOW_SYMLINKS is follow and os.environ["CMPT_FOLLOW_SYMLINKS"] == str(int(follow))
    assert batch["num_bad"] == (0 if follow else 2)
    assert batch["sample_ids"] == (["s0", "s1", "s2", "s3", "s4"] if follow else ["s0", "s1", "s4"])
