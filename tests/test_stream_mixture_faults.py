"""Empty tar shards in the stream, and the ids and members of mixtures (docs/method.md §4).

An empty shard (what img2dataset leaves when every download of a shard failed) is data, not an
error: the stream skips an epoch that reads nothing and resumes exactly; only a stream that no epoch
can feed is an error, one line when the loader is built. All-tar mixtures give ids the member's
``id_prefix`` and copies ``#k``; a member left with no record is an error naming it.
"""

from __future__ import annotations

import io
import itertools
import json
import tarfile

import pytest
import torch
import yaml
from PIL import Image

from broken_corpus import tiny_processor, tiny_tokenizer
from cmpt.data import streaming
from cmpt.data.check import data_check_main
from cmpt.data.config import DataConfig
from cmpt.data.convert import write_tar_samples
from cmpt.data.loader import build_loader
from cmpt.data.mixture import MixtureSource, load_mixture
from cmpt.data.pipeline import SampleBuilder
from cmpt.data.streaming import SampleStream, StreamConfig, StreamingLoader
from cmpt.data.webdataset import ShardList

pytestmark = pytest.mark.usefixtures("one_thread")


def _png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 10, 10)).save(buf, "PNG")
    return buf.getvalue()


def _rec(rid: str | None, answer: str = "A red square.") -> bytes:
    turns = [{"from": "human", "value": "<image>\nWhat is shown?"}, {"from": "gpt", "value": answer}]
    return json.dumps({"conversations": turns, **({"id": rid} if rid else {})}).encode()


def _shard(path, first: int, n: int, *, ids: bool = True, answers: dict[int, str] | None = None) -> str:
    """``n`` samples ``s<first>...`` (ids in the JSON unless ``ids=False``); ``n = 0``: an empty tar."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if n == 0:
        tarfile.open(path, "w").close()  # what img2dataset leaves when every download failed
        return str(path)
    answers = answers or {}
    samples = [
        (f"{i:06d}", {"json": _rec(f"s{i}" if ids else None, answers.get(i, "A red square.")), "png": _png()})
        for i in range(first, first + n)
    ]
    write_tar_samples(str(path), samples)
    return str(path)


def _shards(root, sizes: list[int]) -> ShardList:
    for k, n in enumerate(sizes):
        _shard(root / f"part-{k:04d}.tar", 100 * k, n)
    return ShardList(str(root))


@pytest.fixture(scope="module")
def builder():
    return SampleBuilder(
        tiny_processor(), tiny_tokenizer(), max_text_tokens=512, caption_max_tokens=32, seed=1
    )


def _cfg(**kw) -> StreamConfig:
    return StreamConfig(
        **{"vision_budget": 40, "text_budget": 4000, "max_samples": 2, "buffer_size": 3, **kw}
    )


def _yaml(path, datasets) -> str:
    path.write_text(yaml.safe_dump({"seed": 0, "datasets": datasets}))
    return str(path)


def _equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        torch.equal(a[k], b[k]) if isinstance(a[k], torch.Tensor) else a[k] == b[k] for k in a
    )


def test_empty_shards_are_skipped_and_every_epoch_reads_every_sample(tmp_path, builder):
    shards = _shards(tmp_path, [5, 0, 5, 5])  # 4 shards, 4 streams: one stream per epoch reads nothing
    everything = sorted(f"s{100 * k + i}" for k in (0, 2, 3) for i in range(5))
    by_epoch: dict[int, list[str]] = {}
    for j in range(4):
        stream = SampleStream(shards, j, 4, builder, _cfg())
        while (item := stream.read())[0][0] < 6:
            by_epoch.setdefault(item[0][0], []).append(item[1].id)
    assert all(sorted(by_epoch[e]) == everything for e in range(6))  # disjoint, covering, per epoch
    loader = StreamingLoader(shards, builder, _cfg(), num_streams=4)
    batches = list(itertools.islice(loader, 40))
    assert sum(b["num_samples"] for b in batches) == 80 and min(s["epoch"] for s in loader.states) >= 3


def test_an_epoch_gap_is_not_a_stuck_stream(tmp_path, builder):
    # one shard of four has data, so a stream often skips several empty epochs; its oversize sample
    # after such a gap is not "every sample is over a budget"
    _shard(tmp_path / "d" / "a-0.tar", 0, 3, answers={0: "word " * 200})
    for k in (1, 2, 3):
        _shard(tmp_path / "d" / f"a-{k}.tar", 0, 0)
    loader = StreamingLoader(
        ShardList(str(tmp_path / "d")), builder, _cfg(text_budget=300, buffer_size=1), num_streams=4
    )
    batches = list(itertools.islice(loader, 24))
    assert {i for b in batches for i in b["sample_ids"]} == {"s1", "s2"} and loader.oversize_skipped >= 8


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_across_empty_epochs_is_exact(tmp_path, workers):
    _shards(tmp_path / "d", [5, 0, 5, 0, 5])
    proc, tok = tiny_processor(), tiny_tokenizer()
    cfg = DataConfig(path=str(tmp_path / "d"), vision_budget=40, text_budget=4000, max_samples_per_batch=2,
                     shuffle_buffer=3, num_workers=workers, num_streams=4)  # fmt: skip
    a = build_loader(cfg, proc, tok)
    it = iter(a)
    for _ in range(7):
        next(it)
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)  # as a checkpoint would
    buf.seek(0)
    expected = [next(it) for _ in range(24)]  # several epochs, some of them empty for some streams
    b = build_loader(cfg, proc, tok)
    b.load_state_dict(torch.load(buf, weights_only=True))
    assert all(_equal(x, y) for x, y in zip(expected, itertools.islice(b, 24), strict=True))
    assert min(s["epoch"] for s in b.states) >= 2


def test_a_stream_no_epoch_can_feed_is_one_line_at_build(tmp_path, builder):
    empty = _shards(tmp_path / "e", [0, 0, 0])
    with pytest.raises(ValueError, match="every tar shard is empty") as e:
        build_loader(
            DataConfig(path=str(tmp_path / "e"), num_workers=2, num_streams=2),
            tiny_processor(),
            tiny_tokenizer(),
        )
    assert "\n" not in str(e.value) and "part-0002.tar" in str(e.value) and "Traceback" not in str(e.value)
    with pytest.raises(ValueError, match="every tar shard is empty"):  # a stream used alone does not loop
        SampleStream(empty, 0, 1, builder, _cfg()).read()
    unshuffled = _shards(tmp_path / "u", [3, 0])  # without shuffling, stream 1 only ever reads part-0001
    with pytest.raises(ValueError, match=r"stream 1 of 2 .*part-0001.tar.*data.shuffle is off"):
        StreamingLoader(unshuffled, builder, _cfg(shuffle=False), num_streams=2)
    few = _shards(tmp_path / "f", [2])  # one shard of 2 samples for 4 streams
    with pytest.raises(ValueError, match=r"stream 2 of 4 .*fewer samples than streams"):
        StreamingLoader(few, builder, _cfg(), num_streams=4)


def test_data_check_lists_empty_shards(tmp_path):
    _shards(tmp_path / "d", [2, 0, 2, 0])
    out: list[str] = []
    assert data_check_main(str(tmp_path / "d"), print_fn=out.append) == 0
    warn = [line for line in out if "warning" in line]
    assert len(warn) == 1 and "2 empty tar shard(s)" in warn[0]
    assert "part-0001.tar" in warn[0] and "part-0003.tar" in warn[0] and "part-0000.tar" not in warn[0]
    _shards(tmp_path / "e", [0, 0])
    out.clear()
    assert data_check_main(str(tmp_path / "e"), print_fn=out.append) == 1  # all empty: nothing to train on
    assert any("2 empty tar shard(s)" in line for line in out)


def _stream_ids(shards, builder, n: int) -> list[str]:
    stream = SampleStream(shards, 0, 1, builder, _cfg(shuffle=False))
    return [stream.read()[1].id for _ in range(n)]


def test_all_tar_mixture_ids_carry_prefix_and_copy(tmp_path, builder, monkeypatch):
    monkeypatch.setenv("CMPT_CACHE", str(tmp_path / "cache"))  # the nested mixture's tar index
    a = _shard(tmp_path / "a" / "shard-0000.tar", 0, 2)
    _shard(tmp_path / "b" / "shard-0000.tar", 0, 2, ids=False)  # default ids: same base name as c's
    _shard(tmp_path / "c" / "shard-0000.tar", 0, 2, ids=False)
    pre = load_mixture(
        _yaml(tmp_path / "p.yaml", [{"path": a, "id_prefix": "A/"}, {"path": a, "id_prefix": "B/"}])
    )
    assert [r.id for r in pre.iter_records()] == ["A/s0", "A/s1", "B/s0", "B/s1"]
    assert _stream_ids(pre, builder, 4) == ["A/s0", "A/s1", "B/s0", "B/s1"]
    twice = load_mixture(_yaml(tmp_path / "w.yaml", [{"path": "a/shard-0000.tar", "weight": 2}]))
    assert _stream_ids(twice, builder, 4) == ["s0", "s1", "s0#1", "s1#1"]
    assert twice.read(1, 0).id == "s0#1"  # read back on resume: the same id
    write_tar_samples(str(tmp_path / "bad.tar"), [("000000", {"json": b"{", "png": _png()})])
    bad = load_mixture(_yaml(tmp_path / "z.yaml", [{"path": "bad.tar", "id_prefix": "Z/", "weight": 2}]))
    assert [(e.id, e.reason) for e in bad.iter_records()] == [
        ("Z/bad.tar/000000", "invalid_json"),
        ("Z/bad.tar/000000#1", "invalid_json"),
    ]
    dirs = load_mixture(_yaml(tmp_path / "d.yaml", [{"path": "b"}, {"path": "c"}]))
    ids = [r.id for r in dirs.iter_records()]
    assert ids == [
        "b/shard-0000.tar/000000",
        "b/shard-0000.tar/000001",
        "c/shard-0000.tar/000000",
        "c/shard-0000.tar/000001",
    ]
    # nested in a map-style mixture, read by offset: the same ids
    (tmp_path / "x.json").write_text(
        json.dumps([{"id": "x0", "conversations": json.loads(_rec(None))["conversations"]}])
    )
    outer = load_mixture(
        _yaml(tmp_path / "o.yaml", [{"path": "x.json"}, {"path": "w.yaml", "id_prefix": "W/"}])
    )
    assert isinstance(outer, MixtureSource) and [outer[i].id for i in range(len(outer))] == [
        "x0",
        "W/s0",
        "W/s1",
        "W/s0#1",
        "W/s1#1",
    ]
    # MoCa CL opens an all-tar mixture map-style too: the same ids
    from cmpt.data.pair_loader import open_pair_source

    pairs = open_pair_source(str(tmp_path / "p.yaml"))
    assert [pairs[i].id for i in range(len(pairs))] == ["A/s0", "A/s1", "B/s0", "B/s1"]


def test_a_member_left_without_records_is_an_error(tmp_path):
    rows = [{"id": f"r{i}", "conversations": json.loads(_rec(None))["conversations"]} for i in range(20)]
    (tmp_path / "big.json").write_text(json.dumps(rows))
    (tmp_path / "small.json").write_text(json.dumps(rows[:5]))
    with pytest.raises(ValueError, match=r"datasets\[0\] \(big.json, weight 0.01.*weight ≥ 0.05"):
        load_mixture(
            _yaml(tmp_path / "m.yaml", [{"path": "big.json", "weight": 0.01}, {"path": "small.json"}])
        )
    with pytest.raises(
        ValueError, match=r"m2.yaml: datasets\[1\] \(small.json.*random:5%.*selects none of its 5"
    ):
        load_mixture(
            _yaml(
                tmp_path / "m2.yaml", [{"path": "big.json"}, {"path": "small.json", "sampling": "random:5%"}]
            )
        )
    one = _shard(tmp_path / "t" / "one.tar", 0, 2)
    _shard(tmp_path / "t" / "two.tar", 10, 2)
    with pytest.raises(
        ValueError, match=r"datasets\[0\] \(t/one.tar, weight 0.5.*gets no shard.*weight ≥ 1 "
    ):
        load_mixture(
            _yaml(tmp_path / "h.yaml", [{"path": "t/one.tar", "weight": 0.5}, {"path": "t/two.tar"}])
        )
    _shard(tmp_path / "z" / "000.tar", 0, 0)
    with pytest.raises(ValueError, match=r"datasets\[1\] \(z, weight 1.*only empty tar shards"):
        load_mixture(_yaml(tmp_path / "z.yaml", [{"path": one}, {"path": "z"}]))
    with pytest.raises(ValueError, match=r"none.yaml: a mixture needs at least one member"):
        load_mixture(_yaml(tmp_path / "none.yaml", []))


def test_a_resumed_stream_keeps_its_feed_check_and_epoch_count(tmp_path, builder, monkeypatch):
    # one shard of four has data: stream 0 of 4 skips empty epochs; the first one asks whether any
    # epoch can feed it (a scan of the shards), once per stream, not again after every resume
    shards = _shards(tmp_path / "d", [4, 0, 0, 0])
    calls: list[int] = []
    real = streaming.never_read

    def counting(*a, **kw):
        calls.append(a[1])
        return real(*a, **kw)

    monkeypatch.setattr(streaming, "never_read", counting)
    cfg = _cfg(buffer_size=1, max_samples=1)
    ref = SampleStream(shards, 0, 4, builder, cfg)
    expected = [ref.next_batch() for _ in range(12)]  # several epochs, empty ones among them
    assert calls == [0]
    for k in range(1, 12):
        calls.clear()
        head = SampleStream(shards, 0, 4, builder, cfg)
        for _ in range(k):
            state = head.next_batch()[2]
        tail = SampleStream(shards, 0, 4, builder, cfg, state=state)
        got = [tail.next_batch() for _ in range(12 - k)]
        assert [b[0]["sample_ids"] for b in got] == [b[0]["sample_ids"] for b in expected[k:]], k
        assert calls == [0], (k, calls)  # the resumed stream knows it was fed
        assert tail.state_dict() == ref.state_dict(), k
    assert ref.state_dict()["fed"] and ref.state_dict()["epochs_read"] >= 2
    # a state saved before these counters were kept still loads (as before: counted from the resume)
    k = next(k for k, b in enumerate(expected) if b[2]["epochs_read"])
    old = {key: v for key, v in expected[k][2].items() if key not in ("fed", "epochs_read")}
    tail = SampleStream(shards, 0, 4, builder, cfg, state=old)
    got = [tail.next_batch()[0]["sample_ids"] for _ in range(11 - k)]
    assert got == [b[0]["sample_ids"] for b in expected[k + 1 :]]
    assert tail.state_dict()["epochs_read"] < ref.state_dict()["epochs_read"]
