"""Damaged and unusual tar shards (docs/method.md §4): a shard cut anywhere (on a 512-byte block too,
gzipped too) ends in one ``corrupt_archive`` in place of the sample being read there, the same when
streamed, indexed or resumed at any point; macOS AppleDouble members are skipped; the image paths of
a verbatim LLaVA record map to the image members by position unless every path names one."""

from __future__ import annotations

import gzip
import io
import itertools
import json
import logging
import tarfile

import pytest
from PIL import Image

from broken_corpus import conv, tiny_processor, tiny_tokenizer
from cmpt.data.pipeline import SampleBuilder
from cmpt.data.sources import BadSample
from cmpt.data.streaming import StreamConfig, StreamingLoader
from cmpt.data.tar_index import TarIndexSource
from cmpt.data.webdataset import RawSample, ShardList, decode_sample, split_key

pytestmark = pytest.mark.usefixtures("one_thread")
N = 4  # samples per shard
APPLE_DOUBLE = b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X        " + bytes(40)


def _png(color: tuple[int, int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), color).save(buf, "PNG")
    return buf.getvalue()


def _samples(tag: str, apple_double: bool = False) -> list[tuple[str, bytes]]:
    """``N`` image–conversation samples as tar members (``._`` members before each, as bsdtar)."""
    out = []
    for i in range(N):
        rec = json.dumps({"id": f"{tag}{i}", "conversations": conv()}).encode()
        for ext, data in (("json", rec), ("png", _png((40 * i, 100, 200)))):
            out += [(f"._{i:06d}.{ext}", APPLE_DOUBLE)] if apple_double else []
            out.append((f"{i:06d}.{ext}", data))
    return out


def _tar(members: list[tuple[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), 0o644, 0
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _layout(shard: bytes) -> tuple[list[tarfile.TarInfo], int]:
    """The members of a shard and the byte offset of its end-of-archive marker."""
    with tarfile.open(fileobj=io.BytesIO(shard)) as tf:
        members = tf.getmembers()
    last = members[-1]
    return members, last.offset_data + -(-last.size // 512) * 512


def _outcome(src) -> list[tuple[str, str]]:
    """``[(id, "" or the bad reason)]`` of every sample of a source, in order."""
    return [(r.id, r.reason if isinstance(r, BadSample) else "") for r in src.iter_records()]


def _expected(shard: bytes, cut: int, name: str) -> list[tuple[str, str]]:
    """The samples before the one being read at byte ``cut`` (the last whose header is whole), then
    that sample as ``corrupt_archive``; every sample when the end-of-archive marker is there."""
    members, end = _layout(shard)
    keys = list(dict.fromkeys(split_key(m.name)[0] for m in members))
    if cut >= end + 512:
        return [(f"s{int(k)}", "") for k in keys]
    started = [split_key(m.name)[0] for m in members if m.offset + 512 <= cut]
    if not started:
        return [(f"{name}@0", "corrupt_archive")]
    j = keys.index(started[-1])
    return [(f"s{int(k)}", "") for k in keys[:j]] + [(f"{name}/{keys[j]}", "corrupt_archive")]


def test_a_shard_cut_anywhere_ends_in_one_corrupt_archive(tmp_path):
    shard = _tar(_samples("s"))
    members, end = _layout(shard)
    path = tmp_path / "s.tar"
    cuts = sorted({b + d for b in range(0, end + 1024 + 1, 512) for d in (0, 1, 300)} | {len(shard)})
    for cut in cuts:  # every block boundary (a header, member data, the end marker), +1 and +300
        path.write_bytes(shard[:cut])
        expected = _expected(shard, cut, "s.tar")
        assert _outcome(ShardList(str(path))) == expected, cut
        assert _outcome(TarIndexSource(str(path), cache_dir=None)) == expected, cut  # headers only
    # what the audit saw: a cut at a sample's start used to read as a complete, shorter shard
    path.write_bytes(shard[: members[2 * (N - 1)].offset])
    bad = [r for r in ShardList(str(path)).iter_records() if isinstance(r, BadSample)]
    assert len(bad) == 1 and "without the end-of-archive marker" in bad[0].detail
    assert "s.tar" in bad[0].detail and "copy the shard again" in bad[0].detail


def test_a_cut_before_an_image_is_not_a_text_only_sample(tmp_path):
    shard = _tar(_samples("s"))
    members, _ = _layout(shard)
    png = next(m for m in members if m.name == "000001.png")
    (tmp_path / "s.tar").write_bytes(shard[: png.offset])  # sample 1 keeps its .json only
    assert _outcome(ShardList(str(tmp_path / "s.tar"))) == [("s0", ""), ("s.tar/000001", "corrupt_archive")]


def test_gzipped_shards_read_fully_and_report_cuts(tmp_path):
    shard = _tar(_samples("s"))
    members, _ = _layout(shard)
    whole = [(f"s{i}", "") for i in range(N)]
    (tmp_path / "a.tar.gz").write_bytes(gzip.compress(shard))
    assert _outcome(ShardList(str(tmp_path / "a.tar.gz"))) == whole
    (tmp_path / "b.tar").write_bytes(shard)
    assert _outcome(ShardList(str(tmp_path / "b.tar"))) == whole
    # a cut tar compressed whole (gzip is intact, the tar inside has no end-of-archive marker)
    (tmp_path / "c.tar.gz").write_bytes(gzip.compress(shard[: members[4].offset]))
    assert _outcome(ShardList(str(tmp_path / "c.tar.gz"))) == [
        ("s0", ""),
        ("c.tar.gz/000001", "corrupt_archive"),
    ]
    # a cut gzip stream
    packed = gzip.compress(shard)
    (tmp_path / "d.tar.gz").write_bytes(packed[: len(packed) // 2])
    got = _outcome(ShardList(str(tmp_path / "d.tar.gz")))
    assert got[-1][1] == "corrupt_archive" and got[:-1] == whole[: len(got) - 1]


def test_apple_double_members_are_skipped_and_logged_once(tmp_path, caplog):
    path = tmp_path / "mac.tar"
    path.write_bytes(_tar(_samples("s", apple_double=True)))
    whole = [(f"s{i}", "") for i in range(N)]
    with caplog.at_level(logging.WARNING, logger="cmpt.data"):
        assert _outcome(ShardList(str(path))) == whole
        assert _outcome(ShardList(str(path))) == whole
        assert _outcome(TarIndexSource(str(path), cache_dir=None)) == whole
    notes = [r.getMessage() for r in caplog.records if "hidden member" in r.getMessage()]
    assert len(notes) == 1 and str(path) in notes[0] and f"{2 * N} hidden" in notes[0]
    assert "._000000.json" in notes[0] and "COPYFILE_DISABLE=1" in notes[0]


def _decode(images: list[str], members: dict[str, bytes]) -> list[bytes]:
    turns = [{"from": "human", "value": "<image>" * len(images)}, {"from": "gpt", "value": "a"}]
    rec = json.dumps({"image": images, "conversations": turns}).encode()
    return decode_sample(RawSample("000", {"json": rec, **members}), "s.tar").images


def test_image_paths_never_mix_names_and_positions():
    red, blue = _png((255, 0, 0)), _png((0, 0, 255))
    two = {"0.png": red, "1.png": blue}
    assert _decode(["clip/1.png", "clip/2.png"], two) == [red, blue]  # "1.png" is the 2nd member
    assert _decode(["a/1.png", "b/1.png"], two) == [red, blue]  # two paths, one base name
    assert _decode(["clip/1.png", "clip/0.png"], two) == [blue, red]  # every path names a member
    assert _decode(["000.1.png", "0.png"], two) == [blue, red]
    assert _decode(["png", "png"], {"png": red}) == [red, red]  # the same entry twice
    with pytest.raises(BadSample, match="1 image member") as e:
        _decode(["clip/1.png", "clip/2.png"], {"1.png": blue})
    assert e.value.reason == "missing_image" and "name the members" in e.value.detail


def _run(loader: StreamingLoader, n: int) -> list[tuple[list[str], int]]:
    return [(b["sample_ids"], b["num_bad"]) for b in itertools.islice(loader, n)]


def test_resume_at_every_point_reports_the_damage_as_the_stream_does(tmp_path):
    builder = SampleBuilder(tiny_processor(), tiny_tokenizer(), max_text_tokens=256)
    cfg = StreamConfig(10**6, 10**6, 2, buffer_size=3, seed=0)
    (tmp_path / "a-0.tar").write_bytes(_tar(_samples("a")))
    shard = _tar(_samples("s"))
    members, _ = _layout(shard)
    png, json2 = members[5], members[4]  # 000002.png, 000002.json
    cuts = {
        "in the padding after a sample": png.offset_data + png.size + 10,
        "at a sample's start": json2.offset,
        "in a header": png.offset + 100,
        "in the data": json2.offset_data + 20,
    }
    n = 10  # about three epochs
    for where, cut in cuts.items():
        (tmp_path / "a-1.tar").write_bytes(shard[:cut])
        shards = ShardList(str(tmp_path / "a-{0..1}.tar"))
        ref = _run(StreamingLoader(shards, builder, cfg), n)
        assert sum(bad for _, bad in ref) >= 2, where  # once per epoch
        for k in range(1, n):
            first = StreamingLoader(shards, builder, cfg)
            head = _run(first, k)
            resumed = StreamingLoader(shards, builder, cfg)
            resumed.load_state_dict(first.state_dict())
            assert head + _run(resumed, n - k) == ref, (where, k)


def test_resume_past_the_end_of_a_cut_shard_reports_it(tmp_path):
    shard = _tar(_samples("s"))
    last = _layout(shard)[0][-1]
    path = tmp_path / "s.tar"
    path.write_bytes(shard[: last.offset_data + last.size + 10])  # in the padding after the last member
    size = path.stat().st_size
    for offset in (size, -(-size // 512) * 512):  # a saved offset at or past the end of the file
        got = list(ShardList(str(path)).iter_shard(0, offset))
        assert len(got) == 1 and "without the end-of-archive marker" in got[0].error, offset
