"""Sources: LLaVA JSON, tar shards (streaming) and Hugging Face datasets give the same samples;
rank/worker splits, exact resume of the tar stream and bad tar members (docs/method.md §4)."""

from __future__ import annotations

import importlib.util
import io
import itertools
import json
import tarfile

import pytest
import torch
from PIL import Image

from broken_corpus import conv, noise, tiny_processor, tiny_tokenizer
from cmpt.data.check import check_dataset, data_check_main
from cmpt.data.config import DataConfig
from cmpt.data.convert import llava_to_hf, llava_to_wds, write_tar_samples
from cmpt.data.llava_source import LlavaSource
from cmpt.data.loader import build_loader
from cmpt.data.open import open_source, source_kind
from cmpt.data.pipeline import LengthIndex, SampleBuilder, estimate_lengths, template_overhead
from cmpt.data.sources import BadSample
from cmpt.data.streaming import SampleStream, StreamConfig, StreamingLoader, assign_shards
from cmpt.data.webdataset import RawSample, ShardList, decode_sample, expand_braces, expand_shards, split_key
from cmpt.demo.synthetic import generate

HAS_HF = importlib.util.find_spec("datasets") is not None
needs_hf = pytest.mark.skipif(not HAS_HF, reason="needs the optional `datasets` package")


@pytest.fixture(scope="module")
def forms(tmp_path_factory):
    """One synthetic dataset in every form: JSON, 4 tar shards, 3 tar shards, HF on disk, parquet."""
    root = tmp_path_factory.mktemp("forms")
    js = generate("scenes", 12, root, seed=0)
    wds = llava_to_wds(js, root / "wds", samples_per_shard=3)
    wds3 = llava_to_wds(js, root / "wds3", samples_per_shard=4, prefix="part")
    assert wds["samples"] == 12 and len(wds["shards"]) == 4 and len(wds3["shards"]) == 3
    out = {"json": str(js), "tar": wds["pattern"], "tar3": str(root / "wds3")}
    if HAS_HF:
        out["disk"] = llava_to_hf(js, root / "hf_disk", format="disk")["path"]
        out["parquet"] = llava_to_hf(js, root / "hf_pq", format="parquet")["path"]
    return out


@pytest.fixture(scope="module")
def builder():
    return SampleBuilder(
        tiny_processor(), tiny_tokenizer(), max_text_tokens=512, caption_max_tokens=32, seed=1
    )


def _records(src):
    if isinstance(src, ShardList):
        return list(src.iter_records())
    return [src[i] for i in range(len(src))]


def _equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        torch.equal(a[k], b[k]) if isinstance(a[k], torch.Tensor) else a[k] == b[k] for k in a
    )


def _cfg(path, **kw) -> DataConfig:
    args = dict(path=str(path), vision_budget=40, text_budget=4000, max_samples_per_batch=3, shuffle_buffer=4)
    return DataConfig(**{**args, **kw})


def test_every_form_gives_the_same_samples(forms, builder):
    kinds = {k: source_kind(v) for k, v in forms.items()}
    expected = {"json": "llava", "tar": "tar", "tar3": "tar", "disk": "hf", "parquet": "hf"}
    assert kinds == {k: v for k, v in expected.items() if k in forms}
    ref = _records(open_source(forms["json"]))
    ref_built = [builder.build(r, 2) for r in ref]
    proc, tok = builder.processor, builder.tokenizer
    ref_len = LengthIndex.build(open_source(forms["json"]), proc, tok).lengths
    for kind in [k for k in ("tar", "disk", "parquet") if k in forms]:
        src = open_source(forms[kind])
        recs = _records(src)
        assert [r.id for r in recs] == [r.id for r in ref]
        assert all(isinstance(r.images[0], bytes) for r in recs)  # in memory, not paths
        assert [r.meta for r in recs] == [r.meta for r in ref]
        for a, r in zip(ref_built, recs):
            b = builder.build(r, 2)
            assert a.id == b.id and a.grids == b.grids and a.truncated == b.truncated
            for f in ("patches", "input_ids", "labels", "caption_ids"):
                assert torch.equal(getattr(a, f), getattr(b, f)), (kind, f)
        overhead = template_overhead(tok)
        assert [estimate_lengths(r, proc, tok, overhead) for r in recs] == ref_len
        if kind != "tar":
            assert LengthIndex.build(src, proc, tok).lengths == ref_len


@needs_hf
def test_map_style_loaders_agree_and_split_ranks(forms, tmp_path):
    proc, tok = tiny_processor(), tiny_tokenizer()
    ref = list(itertools.islice(build_loader(_cfg(forms["json"]), proc, tok), 6))
    for kind in ("disk", "parquet"):
        got = list(itertools.islice(build_loader(_cfg(forms[kind]), proc, tok, cache_dir=tmp_path), 6))
        assert all(_equal(a, b) for a, b in zip(ref, got, strict=True))
        loaders = [build_loader(_cfg(forms[kind]), proc, tok, rank=r, world_size=2) for r in range(2)]
        n = len(loaders[0].batcher.epoch_batches(0)) // 2
        ids = [{i for b in itertools.islice(ld, n) for i in b["sample_ids"]} for ld in loaders]
        assert not ids[0] & ids[1] and len(ids[0] | ids[1]) >= 10  # a trailing micro-batch may drop


def test_shard_patterns(forms, tmp_path):
    assert expand_braces("a-{08..11}.tar") == ["a-08.tar", "a-09.tar", "a-10.tar", "a-11.tar"]
    assert expand_braces("{x,y}/s{1..2}") == ["x/s1", "x/s2", "y/s1", "y/s2"]
    assert split_key("dir/000123.0.png") == ("dir/000123", "0.png")
    tar = expand_shards(forms["tar"])
    assert len(tar) == 4 and expand_shards(tar[0].rsplit("/", 1)[0]) == tar
    assert expand_shards(tar[0].rsplit("-", 1)[0] + "-*.tar") == tar
    with pytest.raises(FileNotFoundError):
        expand_shards(str(tmp_path / "none-{0..3}.tar"))


@pytest.mark.parametrize("num_shards", [3, 4, 9])
def test_assignment_is_a_partition(num_shards):
    for epoch in range(3):
        cover = [(s, i) for j in range(4) for s, mod, res in assign_shards(num_shards, 4, j, epoch, 7)
                 for i in range(12) if i % mod == res]  # fmt: skip
        assert sorted(cover) == [(s, i) for s in range(num_shards) for i in range(12)]
    assert assign_shards(9, 4, 0, 0, 7) != assign_shards(9, 4, 0, 1, 7)  # reshuffled per epoch


@pytest.mark.parametrize("form", ["tar", "tar3"])  # 4 shards = 4 streams; 3 shards < 4: split in shards
def test_two_ranks_two_workers_read_disjoint_samples_covering_the_set(forms, builder, form):
    shards = open_source(forms[form])
    cfg = StreamConfig(40, 4000, 3, buffer_size=2, seed=3)
    read = []
    for j in range(4):  # global stream j = rank · 2 + worker stream
        stream, ids = SampleStream(shards, j, 4, builder, cfg), []
        while (item := stream.read())[0][0] == 0:  # epoch 0
            ids.append(item[1].id)
        read.append(ids)
    flat = [i for ids in read for i in ids]
    assert len(flat) == len(set(flat)) == 12 and all(read)
    # the real loaders (2 workers each) run exactly these streams, round-robin
    for rank in range(2):
        loader = StreamingLoader(shards, builder, cfg, rank=rank, world_size=2, num_workers=2)
        direct = [SampleStream(shards, rank * 2 + s, 4, builder, cfg) for s in range(2)]
        for k, batch in enumerate(itertools.islice(loader, 6)):
            assert loader.next_stream == (k + 1) % 2
            assert _equal(batch, direct[k % 2].next_batch()[0])


def test_tar_stream_resumes_exactly_with_workers(forms):
    proc, tok = tiny_processor(), tiny_tokenizer()
    cfg = _cfg(forms["tar"], num_workers=2)
    a = build_loader(cfg, proc, tok)
    it = iter(a)
    for _ in range(3):
        next(it)  # workers prefetched further: the state counts what was consumed
    state = a.state_dict()
    assert state["next_stream"] == 1 and any(s["buffer"] for s in state["streams"])
    expected = [next(it) for _ in range(10)]  # runs into the next epoch
    for workers in (2, 0):
        b = build_loader(_cfg(forms["tar"], num_workers=workers, num_streams=2), proc, tok)
        b.load_state_dict(torch.load(_save(state), weights_only=True))  # as a checkpoint would
        assert all(_equal(x, y) for x, y in zip(expected, itertools.islice(b, 10), strict=True))
    again = list(itertools.islice(a, 2))  # a new iterator continues where the caller stopped
    b = build_loader(_cfg(forms["tar"], num_streams=2), proc, tok)
    b.load_state_dict(state)
    assert all(_equal(x, y) for x, y in zip(again, itertools.islice(b, 10, 12), strict=True))


def _save(state):
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return buf


def _png(seed: int) -> bytes:
    buf = io.BytesIO()
    noise(40, 30, seed=seed).save(buf, "PNG")
    return buf.getvalue()


def test_bad_tar_members_are_skipped_and_counted(tmp_path, builder):
    rec = lambda i, **kw: json.dumps({"id": f"s{i}", "conversations": conv(), **kw}).encode()  # noqa: E731
    samples = [
        ("000", {"json": rec(0), "png": _png(0)}),
        ("001", {"json": rec(1), "png": _png(1)[:60]}),  # truncated PNG
        ("002", {"json": rec(2, image="png")}),  # the image member is missing
        ("003", {"json": b'{"id": "s3", "conversations": [', "png": _png(3)}),  # bad JSON
        ("004", {"png": _png(4)}),  # no JSON
        ("005", {"json": rec(5), "0.png": _png(5)}),
    ]
    write_tar_samples(str(tmp_path / "a-0.tar"), samples)
    good = io.BytesIO()
    with tarfile.open(fileobj=good, mode="w") as tf:
        for name, data in (("100.json", rec(100)), ("100.png", _png(7)), ("101.json", rec(101))):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    with tarfile.open(fileobj=io.BytesIO(good.getvalue())) as tf:
        cut = tf.getmember("101.json").offset + 512 + 20
    (tmp_path / "a-1.tar").write_bytes(good.getvalue()[:cut])  # cut inside the second sample's data
    shards = ShardList(str(tmp_path / "a-{0..1}.tar"))
    report = check_dataset(shards, processor=builder.processor)
    assert {sid: {p.reason for p in probs} for sid, _, probs in report.bad_samples()} == {
        "s1": {"unreadable_image"}, "s2": {"missing_image"}, "a-0.tar/003": {"invalid_json"},
        "a-0.tar/004": {"missing_key"}, "a-1.tar/101": {"corrupt_archive"},
    }  # fmt: skip
    cfg = StreamConfig(100, 4000, 1, shuffle=False)
    loader = StreamingLoader(shards, builder, cfg)
    batches = list(itertools.islice(loader, 4))  # the corrupt tail is read when refilling for s0
    assert [b["sample_ids"] for b in batches] == [["s0"], ["s5"], ["s100"], ["s0"]]
    assert [b["num_bad"] for b in batches] == [0, 4, 0, 1] and loader.bad_seen == 5
    # the loader never aborts on the fraction (the trainer decides over all ranks): 5 of every 8 read are bad
    assert sum(b["num_samples"] for b in itertools.islice(StreamingLoader(shards, builder, cfg), 6)) == 6


def test_records_hold_bytes_and_paths_and_every_kind_is_checked(forms, builder):
    assert isinstance(LlavaSource(forms["json"])[0].image_source(0), str)
    with pytest.raises(BadSample) as e:
        open_source(forms["tar"]).read(0, 1)  # not a header offset
    assert e.value.reason == "corrupt_archive"
    assert check_dataset(open_source(forms["tar"]), processor=builder.processor).num_records == 12
    if HAS_HF:
        assert "bytes" in open_source(forms["parquet"])[0].image_label(0)
        assert check_dataset(open_source(forms["disk"]), processor=builder.processor).num_bad == 0
        assert data_check_main(forms["parquet"], print_fn=lambda *_: None) == 0


def test_multi_image_members_and_image_field():
    two = json.dumps({"id": "m", "conversations": conv("<image> and <image>?")}).encode()
    raw = RawSample("k/7", {"json": two, "1.png": b"B", "0.png": b"A", "txt": b"x"})
    assert decode_sample(raw, "s.tar").images == [b"A", b"B"]  # numbered members, by number
    named = json.dumps({"conversations": conv(), "image": ["7.1.png"]}).encode()
    rec = decode_sample(RawSample("k/7", {"json": named, "1.png": b"B"}), "s.tar")
    assert rec.images == [b"B"] and rec.id == "s.tar/k/7" and rec.origin == "s.tar:k/7"
    with pytest.raises(BadSample, match="bad_value"):
        decode_sample(RawSample("k", {"json": json.dumps({"image": [3]}).encode()}), "s.tar")


@needs_hf
def test_hf_columns_image_feature_paths_and_json_conversations(tmp_path, builder):
    import pyarrow as pa
    import pyarrow.parquet as pq

    noise(50, 40, seed=2).save(tmp_path / "p.png")
    images = [{"bytes": _png(1), "path": None}, {"bytes": None, "path": "p.png"}, None]
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])  # a datasets.Image column
    table = pa.table({
        "image": pa.array(images, type=image_type),
        "conversations": [json.dumps(conv()), json.dumps(conv()), json.dumps(conv("Hi?", "Yes."))],
        "source": ["x", "y", "z"],
    })  # fmt: skip
    pq.write_table(table, tmp_path / "t.parquet")
    src = open_source(tmp_path / "t.parquet")
    recs = [src[i] for i in range(3)]
    assert [r.id for r in recs] == ["t.parquet:0", "t.parquet:1", "t.parquet:2"]
    assert recs[0].meta == {"source": "x"} and isinstance(recs[0].images[0], bytes)
    assert recs[1].images == ["p.png"] and recs[2].images == []  # a path, resolved against the root
    assert [len(builder.build(r).grids) for r in recs] == [1, 1, 0]


def test_documents_survive_conversion_to_tar_shards(tmp_path):
    Image.new("RGB", (32, 32), (9, 9, 9)).save(tmp_path / "a.png")
    docs = [
        {"id": "d1", "text": "Before <image> after.", "image": "a.png"},
        {"id": "p1", "text": "A text-only passage."},
    ]
    js = tmp_path / "docs.jsonl"
    js.write_text("".join(json.dumps(d) + "\n" for d in docs))
    wds = llava_to_wds(js, tmp_path / "wds", samples_per_shard=10)
    recs = list(open_source(wds["pattern"]).iter_records())
    assert [(r.id, r.text, r.conversations) for r in recs] == [(d["id"], d["text"], None) for d in docs]
    assert len(recs[0].images) == 1 and recs[1].images == []
