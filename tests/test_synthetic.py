"""Tests of the built-in synthetic data (charts, docs, scenes): determinism and correctness."""

from __future__ import annotations

import hashlib
import json
import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from cmpt.demo.synthetic import (
    KINDS,
    generate,
    generate_splits,
    sample_image_size,
    synth_main,
)

N = 8


def _hashes(root: Path) -> dict[str, str]:
    """SHA-256 of every file under ``root``, keyed by relative path."""
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _load(path: Path) -> list[dict[str, Any]]:
    return json.loads(path.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def datasets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One small train split per kind (seed 0), generated once for the module."""
    out = {}
    for kind in KINDS:
        root = tmp_path_factory.mktemp(f"{kind}-a")
        generate(kind, N, root, seed=0)
        out[kind] = root
    return out


@pytest.mark.parametrize("kind", KINDS)
def test_deterministic_and_seed_dependent(kind: str, datasets: dict[str, Path], tmp_path: Path) -> None:
    again = tmp_path / "again"
    generate(kind, N, again, seed=0)
    first = _hashes(datasets[kind])
    assert first == _hashes(again)  # byte-identical JSON and PNGs
    expected = {"train.json"} | {f"images/train/{kind}-train-{i:06d}.png" for i in range(N)}
    if kind == "scenes":
        expected |= {f"images/train/{kind}-train-{i:06d}_mask.png" for i in range(N)}
    assert set(first) == expected

    other = tmp_path / "other"
    generate(kind, 3, other, seed=1)
    second = _hashes(other)
    for i in range(3):
        name = f"images/train/{kind}-train-{i:06d}.png"
        assert second[name] != first[name]
    # PNGs carry no timestamp / text metadata chunks.
    for name in first:
        if name.endswith(".png"):
            data = (datasets[kind] / name).read_bytes()
            assert b"tIME" not in data and b"tEXt" not in data and b"iTXt" not in data


def test_prefix_does_not_depend_on_n(datasets: dict[str, Path], tmp_path: Path) -> None:
    generate("scenes", 3, tmp_path, seed=0)
    small, full = _load(tmp_path / "train.json"), _load(datasets["scenes"] / "train.json")
    assert small == full[:3]


@pytest.mark.parametrize("kind", KINDS)
def test_record_format(kind: str, datasets: dict[str, Path]) -> None:
    root = datasets[kind]
    records = _load(root / "train.json")
    assert len(records) == N
    assert len({r["id"] for r in records}) == N
    for rec in records:
        assert set(rec) == {"id", "image", "conversations", "meta"}
        assert rec["image"] == f"images/train/{rec['id']}.png"
        with Image.open(root / rec["image"]) as im:
            assert im.mode == "RGB"
            assert im.size == (rec["meta"]["width"], rec["meta"]["height"])
        conv = rec["conversations"]
        assert len(conv) >= 4 and len(conv) % 2 == 0
        assert [t["from"] for t in conv] == ["human", "gpt"] * (len(conv) // 2)
        assert sum(t["value"].count("<image>") for t in conv) == 1
        assert conv[0]["value"].startswith("<image>\n")
        # Turn 1 asks for a description answered by the dense caption; the rest are the QA pairs.
        meta = rec["meta"]
        assert conv[1]["value"] == meta["caption"]
        qa_turns = [(conv[i]["value"], conv[i + 1]["value"]) for i in range(2, len(conv), 2)]
        assert qa_turns == [(qa["q"], qa["a"]) for qa in meta["qa"]]
        assert all(qa["a"] for qa in meta["qa"])


def test_sizes_vary(datasets: dict[str, Path]) -> None:
    sizes = []
    for kind in KINDS:
        sizes += [(r["meta"]["width"], r["meta"]["height"]) for r in _load(datasets[kind] / "train.json")]
    ratios = {round(w / h, 1) for w, h in sizes}
    assert len(ratios) >= 6
    assert min(w / h for w, h in sizes) < 0.7 and max(w / h for w, h in sizes) > 1.5
    assert all(160 <= w <= 640 and 120 <= h <= 640 for w, h in sizes)

    rng = random.Random(123)
    draws = [sample_image_size(rng) for _ in range(2000)]
    assert all(160 <= w <= 640 and 120 <= h <= 640 and 1 / 3.05 <= w / h <= 3.05 for w, h in draws)
    assert min(w / h for w, h in draws) < 0.4 and max(w / h for w, h in draws) > 2.5


# ----------------------------------------------------------------------------- charts


def test_chart_answers_by_construction(datasets: dict[str, Path]) -> None:
    seen_types = set()
    for rec in _load(datasets["charts"] / "train.json"):
        meta = rec["meta"]
        table: dict[str, int] = meta["table"]
        seen_types.add(meta["chart_type"])
        assert meta["chart_type"] in {"bar", "line", "pie"}
        assert 3 <= len(table) <= 6
        assert all(isinstance(v, int) for v in table.values())
        assert len(set(table.values())) == len(table)  # distinct → unique max/min
        caption = meta["caption"]
        assert meta["title"] in caption and f"{meta['chart_type']} chart" in caption
        for cat, val in table.items():
            assert f"{cat} is {val}" in caption
        types = set()
        for qa in meta["qa"]:
            q, a, t = qa["q"], qa["a"], qa["type"]
            types.add(t)
            if t == "value":
                cat = re.fullmatch(r"What is the value of (.+)\?", q).group(1)
                assert a == str(table[cat])
            elif t == "max":
                assert a == sorted(table.items(), key=lambda kv: -kv[1])[0][0]
            elif t == "min":
                assert a == sorted(table.items(), key=lambda kv: kv[1])[0][0]
            elif t == "compare":
                x, y = re.fullmatch(r"Is (.+) greater than (.+)\?", q).groups()
                assert a == ("Yes" if table[x] > table[y] else "No")
            elif t == "diff":
                x, y = re.fullmatch(r"What is the difference between (.+) and (.+)\?", q).groups()
                assert int(a) == abs(table[x] - table[y])
            else:
                raise AssertionError(f"unexpected QA type {t}")
        assert types == {"value", "max", "min", "compare", "diff"}
    assert len(seen_types) >= 2


# ----------------------------------------------------------------------------- docs


def _cents(s: str) -> int:
    units, cents = s.split(".")
    assert len(cents) == 2
    return int(units) * 100 + int(cents)


def test_doc_answers_by_construction(datasets: dict[str, Path]) -> None:
    fixed = {"Store", "Date", "Time", "Total", "Cashier"}
    for rec in _load(datasets["docs"] / "train.json"):
        meta = rec["meta"]
        fields: dict[str, str] = meta["fields"]
        assert meta["doc_type"] in {"invoice", "receipt", "form"}
        lines = meta["text"].split("\n")
        assert lines[0] == meta["title"]
        assert lines[1:] == [f"{k}: {v}" for k, v in fields.items()]
        for k, v in fields.items():
            assert f"{k}: {v}" in meta["caption"]
        for qa in meta["qa"]:
            m = re.fullmatch(r"What is the price of (.+)\?", qa["q"]) or re.fullmatch(
                r"What is the (.+)\?", qa["q"]
            )
            assert qa["a"] == fields[m.group(1)] == fields[qa["key"]]
        assert len({qa["key"] for qa in meta["qa"]}) == len(meta["qa"]) == 3
        if meta["doc_type"] == "invoice":
            assert _cents(fields["Subtotal"]) + _cents(fields["Tax"]) == _cents(fields["Total"])
        elif meta["doc_type"] == "receipt":
            items = [k for k in fields if k not in fixed]
            assert 2 <= len(items) <= 4
            assert sum(_cents(fields[k]) for k in items) == _cents(fields["Total"])


# ----------------------------------------------------------------------------- scenes


def test_scene_masks_labels_and_answers(datasets: dict[str, Path]) -> None:
    root = datasets["scenes"]
    labels = []
    for rec in _load(root / "train.json"):
        meta = rec["meta"]
        shapes = meta["shapes"]
        classes, seg_classes = meta["classes"], meta["seg_classes"]
        assert classes == ["circle", "square", "triangle"]
        assert seg_classes == ["background", *classes]
        assert 2 <= len(shapes) <= 5
        largest = max(shapes, key=lambda s: s["area"])
        assert meta["label_name"] == largest["shape"] == classes[meta["label"]]
        labels.append(meta["label"])

        assert meta["mask"] == f"images/train/{rec['id']}_mask.png"
        with Image.open(root / meta["mask"]) as m:
            assert m.mode == "L"
            mask = np.asarray(m)
        image = np.asarray(Image.open(root / rec["image"]).convert("RGB"))
        assert mask.shape == image.shape[:2]
        assert set(np.unique(mask).tolist()) <= {0, 1, 2, 3}  # exact mask: no 255
        assert (mask == 0).any()

        # Every shape is where meta says: its class fills about its area inside its bbox, and the
        # image has exactly the shape's colour wherever the mask has the shape's class.
        for s in shapes:
            x0, y0, x1, y1 = s["bbox"]
            box = mask[y0 : y1 + 1, x0 : x1 + 1]
            cls = seg_classes.index(s["shape"])
            count = int((box == cls).sum())
            perimeter = 2 * ((x1 - x0) + (y1 - y0))
            # Pillow fills boundary pixels too: up to about half the perimeter more than the area.
            assert abs(count - s["area"]) <= 0.75 * perimeter + 4, (rec["id"], s, count)
            pix = image[y0 : y1 + 1, x0 : x1 + 1][box == cls]
            assert (pix == np.array(s["rgb"], dtype=np.uint8)).all()
        # Shapes do not overlap, so each mask pixel belongs to exactly one bbox.
        boxes = [s["bbox"] for s in shapes]
        for i, a in enumerate(boxes):
            for b in boxes[i + 1 :]:
                assert a[2] < b[0] or b[2] < a[0] or a[3] < b[1] or b[3] < a[1]
        # Background pixels never take a shape colour; the label's class owns the most pixels.
        palette = {tuple(s["rgb"]) for s in shapes}
        bg = image[mask == 0]
        for rgb in palette:
            assert not (bg == np.array(rgb, dtype=np.uint8)).all(axis=1).any()
        counts = [int((mask == c).sum()) for c in range(1, 4)]
        assert int(np.argmax(counts)) == meta["label"]

        caption = meta["caption"]
        for s in shapes:
            assert f"{s['color']} {s['shape']}" in caption
        for qa in meta["qa"]:
            q, a, t = qa["q"], qa["a"], qa["type"]
            if t == "count":
                assert a == str(len(shapes))
            elif t == "largest_color":
                assert a == largest["color"]
            elif t == "largest_shape":
                assert a == largest["shape"]
            elif t == "count_color":
                color = re.fullmatch(r"How many (\w+) shapes are there\?", q).group(1)
                assert a == str(sum(s["color"] == color for s in shapes))
            elif t == "count_shape":
                shape = re.fullmatch(r"How many (\w+)s are there\?", q).group(1)
                assert a == str(sum(s["shape"] == shape for s in shapes))
            else:
                raise AssertionError(f"unexpected QA type {t}")
    assert len(set(labels)) >= 2


# ----------------------------------------------------------------------------- splits / CLI entry


def test_splits_use_different_seed_streams(tmp_path: Path) -> None:
    paths = generate_splits("scenes", tmp_path, n_train=4, n_val=2, n_test=4, seed=0)
    assert set(paths) == {"train", "val", "test"}
    recs = {split: _load(p) for split, p in paths.items()}
    assert [len(recs[s]) for s in ("train", "val", "test")] == [4, 2, 4]

    def digests(split: str) -> set[str]:
        return {hashlib.sha256((tmp_path / r["image"]).read_bytes()).hexdigest() for r in recs[split]}

    assert not digests("train") & digests("test")
    assert not digests("train") & digests("val")
    assert not digests("val") & digests("test")
    assert all(r["id"].startswith("scenes-test-") for r in recs["test"])
    assert all(r["image"].startswith("images/test/") for r in recs["test"])


def test_synth_main(tmp_path: Path) -> None:
    summary = synth_main("docs", 8, tmp_path, seed=3)
    assert {k: v["n"] for k, v in summary["splits"].items()} == {"train": 8, "val": 2, "test": 2}
    assert json.loads(json.dumps(summary)) == summary  # serialisable for the CLI
    for info in summary["splits"].values():
        assert len(_load(Path(info["json"]))) == info["n"]
    summary = synth_main("docs", 5, tmp_path / "b", splits="train:2,test:3")
    assert {k: v["n"] for k, v in summary["splits"].items()} == {"train": 2, "test": 3}
    with pytest.raises(ValueError):
        synth_main("videos", 2, tmp_path / "c")
    with pytest.raises(ValueError):
        generate("videos", 2, tmp_path / "d")
