"""Contrastive pairs (MoCa stage 2): records from every source, rendering as the Embedder, k hard
negatives, collation order, bad pairs with reasons, the task-homogeneous loader (docs/method.md §3, §4)."""

from __future__ import annotations

import importlib.util
import io
import itertools
import json
import logging
import shutil

import pytest
import torch

from broken_corpus import noise, tiny_processor, tiny_tokenizer
from cmpt.data.check import check_dataset, data_check_main
from cmpt.data.config import DataConfig
from cmpt.data.convert import write_tar_samples
from cmpt.data.pair_loader import PairLoader, TarPairSource, open_pair_source, record_tasks
from cmpt.data.pairs import PairBuilder, build_pair_loader, collate_pairs
from cmpt.data.sources import REASONS, BadSample
from cmpt.data.tar_index import TarIndexSource
from cmpt.data.task_sampler import TaskBatchSampler
from cmpt.vlm.chat import encode_text_with_images, plain_input
from cmpt.vlm.vision_tokens import IGNORE_INDEX, VISION_END

HAS_HF = importlib.util.find_spec("datasets") is not None
IMG = "Represent the given image."


def _png(w: int, h: int, seed: int) -> bytes:
    buf = io.BytesIO()
    noise(w, h, seed=seed).save(buf, "PNG")
    return buf.getvalue()


def _good() -> list[dict]:
    return [
        {"id": "p0", "task": "a", "qry": "Find an image of a red circle.", "qry_image_path": None,
         "pos_text": IMG, "pos_image_path": "img/0.png",
         "neg_text": [IMG, IMG, IMG], "neg_image_path": ["img/1.png", "img/2.png", "img/3.png"]},
        {"id": "p1", "task": "a", "qry": "Describe the picture.", "qry_image_path": "img/1.png",
         "pos_text": "A noisy picture.", "pos_image_path": None, "neg_text": "A clean one.",
         "neg_image_path": None},
        {"id": "p2", "task": "a", "qry": "Look <image> here, what is it?", "qry_image_path": "img/2.png",
         "pos_text": IMG, "pos_image_path": "img/3.png", "neg_text": "", "neg_image_path": ""},
        {"id": "p3", "task": "a", "qry": "<|image_1|>\nMMEB-style query", "qry_image_path": "img/3.png",
         "pos_text": "answer three", "neg_text": ["wrong one", "wrong two"], "neg_image_path": None},
    ] + [
        {"id": f"b{i}", "task": "b", "qry": f"query number {i}", "pos_text": IMG,
         "pos_image_path": f"img/{i}.png", "neg_text": [IMG], "neg_image_path": [f"img/{(i + 1) % 4}.png"]}
        for i in range(4)
    ]  # fmt: skip


BAD = {
    "x_empty_q": ({"qry": "  ", "pos_text": "p"}, "empty_query"),
    "x_empty_p": ({"qry": "q", "pos_text": "", "pos_image_path": None}, "empty_positive"),
    "x_same": ({"qry": "q", "pos_text": IMG, "pos_image_path": "img/0.png", "neg_text": [IMG, IMG],
                "neg_image_path": ["img/1.png", "img/0.png"]}, "negative_is_positive"),
    "x_missing": ({"qry": "q", "pos_text": IMG, "pos_image_path": "img/nope.png"}, "missing_image"),
    "x_escape": ({"qry": "q", "pos_image_path": "../outside.png"}, "path_escape"),
    "x_placeholder": ({"qry": "<image> what?", "pos_text": "p"}, "placeholder_mismatch"),
    "x_lists": ({"qry": "q", "pos_text": "p", "neg_text": ["a", "b"], "neg_image_path": ["img/0.png"]},
                "bad_value"),
    "x_nopos": ({"qry": "q"}, "missing_key"),
    "x_broken": ({"qry": "q", "pos_text": IMG, "pos_image_path": "img/broken.png"}, "unreadable_image"),
}  # fmt: skip


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("CMPT_CACHE", str(tmp_path / "cache"))  # tar indexes


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """The same pairs as JSONL, tar shards (images as members) and parquet (images as bytes)."""
    root = tmp_path_factory.mktemp("pairs")
    (root / "img").mkdir()
    png = {f"img/{i}.png": _png(40 + 12 * i, 60 - 5 * i, seed=i) for i in range(4)}
    for k, v in png.items():
        (root / k).write_bytes(v)
    (root / "img" / "broken.png").write_bytes(png["img/0.png"][:60])
    rows = _good()
    (root / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    bad = [{"id": k, "task": "a", **r} for k, (r, _) in BAD.items()]
    (root / "bad.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:4] + bad) + "{not json\n")
    (root / "wds" / "shards").mkdir(parents=True)
    samples = []
    for n, r in enumerate(rows):
        obj, members = dict(r), {}
        for side in ("qry", "pos"):
            if obj.get(f"{side}_image_path"):
                members[f"{side}.png"] = png[obj[f"{side}_image_path"]]
                obj[f"{side}_image_path"] = f"{side}.png" if side == "qry" else f"{n:06d}.{side}.png"
        negs = obj.get("neg_image_path") or []
        if isinstance(negs, list) and any(negs):
            for j, p in enumerate(negs):
                members[f"neg{j}.png"] = png[p]
            obj["neg_image_path"] = [f"neg{j}.png" for j in range(len(negs))]
        samples.append((f"{n:06d}", {"json": json.dumps(obj).encode(), **members}))
    write_tar_samples(str(root / "wds" / "shards" / "s-000000.tar"), samples)
    out = {"root": root, "jsonl": str(root / "pairs.jsonl"), "tar": str(root / "wds" / "shards"), "png": png}
    if HAS_HF:
        import pyarrow as pa
        import pyarrow.parquet as pq

        image = pa.struct([("bytes", pa.binary()), ("path", pa.string())])

        def im(p):
            return None if not p else {"bytes": png[p], "path": None}

        def lst(x):
            return [] if x in (None, "") else [x] if isinstance(x, str) else x

        cols = {
            "id": [r["id"] for r in rows], "task": [r["task"] for r in rows],
            "qry": [r["qry"] for r in rows],
            "qry_image_path": pa.array([im(r.get("qry_image_path")) for r in rows], image),
            "pos_text": [r.get("pos_text") for r in rows],
            "pos_image_path": pa.array([im(r.get("pos_image_path")) for r in rows], image),
            "neg_text": [lst(r.get("neg_text")) for r in rows],
            "neg_image_path": pa.array([[im(p) for p in lst(r.get("neg_image_path"))] for r in rows],
                                       pa.list_(image)),
        }  # fmt: skip
        pq.write_table(pa.table(cols), root / "pairs.parquet")
        out["parquet"] = str(root / "pairs.parquet")
    return out


def _builder(tok, **kw) -> PairBuilder:
    return PairBuilder(tiny_processor(), tok, **kw)


def test_hard_negatives_first_k_repeat_last_or_masked(data, tok):
    src = open_pair_source(data["jsonl"])
    b = _builder(tok, num_hard_negatives=2)
    proc = tiny_processor()
    s0, s1, s2 = (b.build(src[i]) for i in range(3))
    for j, name in enumerate(("img/1.png", "img/2.png")):  # the first k of three
        assert torch.equal(s0.negatives[j].patches, proc.preprocess(str(data["root"] / name))[0])
    assert s0.neg_valid == s1.neg_valid == [True, True]
    assert torch.equal(s1.negatives[0].input_ids, s1.negatives[1].input_ids)  # one negative, repeated
    assert s2.neg_valid == [False, False]  # "" / "" = no negative: placeholder slots
    assert all(len(n.input_ids) == 1 and not n.grids and len(n.patches) == 0 for n in s2.negatives)
    assert [
        len(b.build(src[0]).negatives) for b in (_builder(tok, num_hard_negatives=k) for k in (0, 3))
    ] == [0, 3]
    batch = collate_pairs([_builder(tok, num_hard_negatives=0).build(src[i]) for i in range(2)])
    assert batch["neg_mask"].shape == (2, 0) and len(batch["cu_seqlens"]) == 5


def test_inputs_render_as_the_embedder_renders_them(data, tok):
    src = open_pair_source(data["jsonl"])
    b = _builder(tok, max_text_tokens=1280)
    m2 = b.merge_size**2

    def ref(text, image):
        grids = [] if image is None else [tuple(tiny_processor().preprocess(str(data["root"] / image))[1])]
        n = [h * w // m2 for h, w in grids]
        return encode_text_with_images(plain_input(text, len(n)), tok, n)

    s1, s2, s3 = (b.build(src[i]) for i in (1, 2, 3))
    assert torch.equal(s1.query.input_ids, ref("Describe the picture.", "img/1.png"))  # <image> line first
    assert torch.equal(s1.positive.input_ids, ref("A noisy picture.", None))
    assert torch.equal(s2.query.input_ids, ref("Look <image> here, what is it?", "img/2.png"))  # interleaved
    assert torch.equal(s2.positive.input_ids, ref(IMG, "img/3.png"))
    assert torch.equal(s3.query.input_ids, ref("<image>\nMMEB-style query", "img/3.png"))  # <|image_1|>
    assert all((x.labels == IGNORE_INDEX).all() for x in s1.sequences)
    # truncation as the Embedder: at max_text_tokens, never before the end of the last image
    long = " ".join(["word"] * 200)
    rec = src[1]
    rec.meta["qry"] = long
    q = _builder(tok, max_text_tokens=20).build(rec).query
    assert len(q.input_ids) == 20 and q.truncated and q.grids
    rec.meta["qry"] = long + " <image>"
    q = _builder(tok, max_text_tokens=20).build(rec).query
    end = tok.convert_tokens_to_ids(VISION_END)
    assert len(q.input_ids) > 20 and q.input_ids[-1] == end and not q.truncated


def test_collate_packs_queries_positives_then_negatives(data, tok):
    src = open_pair_source(data["jsonl"])
    b = _builder(tok)
    samples = [b.build(src[i]) for i in range(4)]
    batch = collate_pairs(samples, num_bad=3)
    seqs = (
        [s.query for s in samples] + [s.positive for s in samples] + [n for s in samples for n in s.negatives]
    )
    assert len(seqs) == 4 + 4 + 8
    lengths = [len(x.input_ids) for x in seqs]
    assert batch["cu_seqlens"].dtype == torch.int32 and batch["cu_seqlens"].diff().tolist() == lengths
    assert torch.equal(batch["input_ids"], torch.cat([x.input_ids for x in seqs]))
    assert (batch["labels"] == IGNORE_INDEX).all() and batch["labels"].shape == batch["input_ids"].shape
    assert batch["images_per_sample"].tolist() == [len(x.grids) for x in seqs]
    assert batch["grid_hw"].tolist() == [list(g) for x in seqs for g in x.grids]
    assert batch["patches"].shape[0] == sum(h * w for x in seqs for h, w in x.grids)
    assert batch["neg_mask"].tolist() == [[True, True], [True, True], [False, False], [True, True]]
    assert (batch["num_pairs"], batch["num_hard_negatives"], batch["num_samples"], batch["num_bad"]) == (
        4,
        2,
        4,
        3,
    )
    assert batch["task"] == "a" and batch["sample_ids"] == ["p0", "p1", "p2", "p3"]
    assert batch["num_tokens"] == sum(lengths) and batch["pair_mask"].all()
    padded = collate_pairs(samples[:3], pad_to=4)
    assert (
        padded["num_pairs"] == 4
        and padded["num_samples"] == 3
        and padded["pair_mask"].tolist() == [1, 1, 1, 0]
    )
    assert padded["sample_ids"] == ["p0", "p1", "p2", "p0"]
    other = b.build(src[4])
    with pytest.raises(ValueError, match="one task per batch"):
        collate_pairs([samples[0], other])


def test_bad_pairs_are_counted_with_reasons(data, tok, caplog):
    assert {"empty_query", "empty_positive", "negative_is_positive"} <= set(REASONS)
    src = open_pair_source(str(data["root"] / "bad.jsonl"))
    b = _builder(tok)
    reasons = {}
    for i in range(len(src)):
        try:
            b.build(src[i])
        except BadSample as e:
            reasons[e.id] = e.reason
    expected = {k: r for k, (_, r) in BAD.items()}
    assert reasons == {**expected, "bad.jsonl:13": "invalid_json"}
    report = check_dataset(src)  # the checker agrees (cmpt data check)
    assert {sid: p[0].reason for sid, _, p in report.bad_samples()} == reasons
    assert data_check_main(str(data["root"] / "bad.jsonl"), print_fn=lambda *_: None) == 1
    assert data_check_main(data["jsonl"], print_fn=lambda *_: None) == 0
    # the loader skips them (logged with id and reason), replacing each by a good spare
    tasks = record_tasks(src)
    assert tasks == ["a"] * 13 + ["bad"]  # an unreadable line belongs to the file's default task
    loader = PairLoader(src, b, TaskBatchSampler(tasks, 2, 1, seed=0), log_limit=1000)
    with caplog.at_level(logging.WARNING, logger="cmpt.data"):
        batches = list(itertools.islice(iter(loader), 12))
    assert all(x["num_pairs"] == 2 and x["num_samples"] == 2 and x["task"] == "a" for x in batches)
    assert all(set(x["sample_ids"]) <= {"p0", "p1", "p2", "p3"} for x in batches)
    assert loader.bad_seen == sum(x["num_bad"] for x in batches) >= 9
    assert "skipping bad sample x_same: negative_is_positive" in caplog.text


def test_lost_pairs_are_padded_and_all_bad_batches_are_empty(data, tok):
    rows = [*_good()[:2], {"id": "z", "task": "a", "qry": "", "pos_text": "p"}]
    rows += [{"id": f"y{i}", "task": "y", "qry": "", "pos_text": "p"} for i in range(2)]
    path = data["root"] / "lossy.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    src = open_pair_source(str(path))
    assert record_tasks(src) == ["a", "a", "a", "y", "y"]
    loader = PairLoader(src, _builder(tok), TaskBatchSampler(record_tasks(src), 3, 1))
    x = next(iter(loader))  # task "a": three records, one bad, no spare outside the batch
    assert (x["num_pairs"], x["num_samples"], x["num_bad"]) == (3, 2, 1)
    assert x["pair_mask"].tolist() == [True, True, False] and x["sample_ids"][2] == x["sample_ids"][0]
    loader = PairLoader(src, _builder(tok), TaskBatchSampler(record_tasks(src), 2, 1))
    out = list(itertools.islice(iter(loader), 4))  # "a": a bad pair is replaced by the spare
    assert all(
        b["num_pairs"] == b["num_samples"] == 2 and b["pair_mask"].all() for b in out if b["task"] == "a"
    )
    empty = [b for b in out if b["task"] == "y"]  # all bad, no spare: empty, the ranks stay in step
    assert len(empty) == 2 and all(
        b["num_pairs"] == b["num_samples"] == 0 and b["num_bad"] == 2 for b in empty
    )


def test_a_task_without_hard_negatives_is_named_once(data, tok, caplog):
    """``loss.num_hard_negatives = k`` but a task's pairs carry none: one warning for that task."""
    rows = [{"id": f"n{i}", "task": "noneg", "qry": f"q {i}", "pos_text": f"p {i}"} for i in range(4)]
    path = data["root"] / "noneg.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in [*_good(), *rows]))
    src = open_pair_source(str(path))
    loader = PairLoader(src, _builder(tok), TaskBatchSampler(record_tasks(src), 2, 1))
    with caplog.at_level(logging.WARNING, logger="cmpt.data"):
        tasks = [b["task"] for b in itertools.islice(iter(loader), 12)]
    assert tasks.count("noneg") >= 2  # two of its batches read, one warning
    named = [r.getMessage() for r in caplog.records if "hard negative" in r.getMessage()]
    assert len(named) == 1 and "'noneg'" in named[0] and "loss.num_hard_negatives" in named[0], named


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        torch.equal(a[k], b[k]) if isinstance(a[k], torch.Tensor) else a[k] == b[k] for k in a
    )


def test_jsonl_tar_and_hf_give_identical_batches_and_resume_is_exact(data, tok):
    kinds = [k for k in ("jsonl", "tar", "parquet") if k in data]
    proc = tiny_processor()

    def loader(kind: str, rank: int, **kw):
        cfg = DataConfig(path=data[kind], seed=4, **kw)
        return build_pair_loader(cfg, proc, tok, rank=rank, world_size=2, batch_size=2, num_hard_negatives=2)

    ref = {r: list(itertools.islice(iter(loader("jsonl", r)), 6)) for r in range(2)}
    for r0, r1 in zip(ref[0], ref[1]):  # both ranks on the same global batch, disjoint pairs
        assert (r0["epoch"], r0["batch_index"], r0["task"]) == (r1["epoch"], r1["batch_index"], r1["task"])
        assert not set(r0["sample_ids"]) & set(r1["sample_ids"])
    assert {x["task"] for x in ref[0]} == {"a", "b"}
    for kind in kinds[1:]:
        other = list(itertools.islice(iter(loader(kind, 1)), 6))
        assert all(_same(a, b) for a, b in zip(ref[1], other)), kind
    first = loader("jsonl", 1)
    it = iter(first)
    head = [next(it) for _ in range(3)]
    resumed = loader("jsonl", 1)
    resumed.load_state_dict(first.state_dict())
    tail = list(itertools.islice(iter(resumed), 3))
    assert all(_same(a, b) for a, b in zip(head + tail, ref[1]))
    workers = list(itertools.islice(iter(loader("jsonl", 1, num_workers=1)), 3))
    assert all(_same(a, b) for a, b in zip(workers, ref[1]))


def test_mixtures_and_default_tasks(data, tok, tmp_path):
    rows = _good()
    for name, part in (("cap", rows[:4]), ("vqa", rows[4:])):  # no "task": the file's name is the task
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps({**r, "task": None}) + "\n" for r in part))
    shutil.copytree(data["root"] / "img", tmp_path / "img")
    mix = tmp_path / "mix.yaml"
    mix.write_text("datasets:\n  - {path: cap.jsonl, id_prefix: 'c/'}\n  - {path: vqa.jsonl, weight: 2}\n")
    src = open_pair_source(str(mix))
    assert record_tasks(src) == ["cap"] * 4 + ["vqa"] * 8
    cfg = DataConfig(path=str(mix))
    it = iter(build_pair_loader(cfg, tiny_processor(), tok, batch_size=4, num_hard_negatives=1))
    batches = [next(it) for _ in range(3)]
    assert sorted(b["task"] for b in batches) == ["cap", "vqa", "vqa"]
    assert all(b["sample_ids"][0].startswith("c/") for b in batches if b["task"] == "cap")
    # tar shards: a mixture of them, and the checker reads their pairs
    (tmp_path / "tar.yaml").write_text(f"datasets:\n  - {{path: {data['tar']}}}\n")
    assert record_tasks(open_pair_source(str(tmp_path / "tar.yaml"))) == [r["task"] for r in rows]
    assert data_check_main(data["tar"], print_fn=lambda *_: None) == 0
    if HAS_HF:
        assert data_check_main(data["parquet"], print_fn=lambda *_: None) == 0


def test_tar_pairs_are_read_through_the_tar_index(data, tmp_path):
    src = open_pair_source(data["tar"])
    assert isinstance(src, TarIndexSource) and TarPairSource is TarIndexSource
    assert len(list((tmp_path / "cache" / "tar_index").glob("tar-index-*.json"))) == 1  # offsets cached
    assert (
        [r.id for r in src.iter_records()]
        == [src[i].id for i in range(len(src))]
        == [r["id"] for r in _good()]
    )
    # no task in the records: each shard's directory names it
    rows = [{"qry": f"q{n}", "pos_text": "p"} for n in range(3)]
    samples = [(f"{n:06d}", {"json": json.dumps(r).encode()}) for n, r in enumerate(rows)]
    for name in ("retrieval", "vqa"):
        (tmp_path / name).mkdir()
        write_tar_samples(str(tmp_path / name / "s-000000.tar"), samples)
    src = open_pair_source([str(tmp_path / "retrieval"), str(tmp_path / "vqa" / "s-000000.tar")])
    assert record_tasks(src) == ["retrieval"] * 3 + ["vqa"] * 3


@pytest.mark.skipif(not HAS_HF, reason="needs the optional `datasets` package")
def test_pair_data_splits(data, tok, tmp_path):
    import pyarrow.parquet as pq

    hub = tmp_path / "hub"
    (hub / "data").mkdir(parents=True)
    table = pq.read_table(data["parquet"])
    pq.write_table(table.slice(0, 4), hub / "data" / "train-00000-of-00001.parquet")
    pq.write_table(table.slice(4, 4), hub / "data" / "test-00000-of-00001.parquet")
    test_ids = {r["id"] for r in _good()[4:]}
    for src in (open_pair_source(f"{hub}#test"), open_pair_source(hub, split="test")):
        assert {src[i].id for i in range(len(src))} == test_ids and record_tasks(src) == ["b"] * 4
    assert record_tasks(open_pair_source(hub)) == ["a"] * 4  # train by default

    def ids(path: str) -> set[str]:
        cfg = DataConfig(path=path, seed=1)
        loader = build_pair_loader(cfg, tiny_processor(), tok, batch_size=2, num_hard_negatives=1)
        return {i for b in itertools.islice(iter(loader), 4) for i in b["sample_ids"]}

    assert ids(f"{hub}#test") == test_ids
    (tmp_path / "mix.yaml").write_text(f"datasets:\n  - {{path: {hub}, split: test, id_prefix: 't/'}}\n")
    assert ids(str(tmp_path / "mix.yaml")) == {f"t/{i}" for i in test_ids}
    assert data_check_main(f"{hub}#test", print_fn=lambda *_: None) == 0
    with pytest.raises(ValueError, match="only to Hugging Face"):
        open_pair_source(data["tar"], split="test")
