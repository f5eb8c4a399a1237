"""The length index built once, in parallel, cached by content and shared (docs/method.md §4).

Parallel builds (processes, threads) equal the serial one and ``estimate_lengths`` record by record,
on a corpus full of broken inputs. The cache is reused by a tokenizer reloaded from another
directory (what a second stage does) without reading one image header, and rebuilt when an image
or the data file changes. Two processes racing for one cache build it once; two ranks of a process
group build it once (rank 0) and the other receives it; a second tiny stage reuses the first
stage's index and the trainer logs its time to first step (both slow).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from broken_corpus import build_broken_corpus, tiny_processor, tiny_tokenizer
from cmpt.data import length_cache as LC
from cmpt.data import length_index as LI
from cmpt.data import length_scan as LS
from cmpt.data.llava_source import LlavaSource
from cmpt.data.pipeline import LengthIndex, estimate_lengths, template_overhead
from cmpt.data.sources import BadSample
from cmpt.demo.tiny_lm import default_corpus, train_tokenizer
from cmpt.vlm.chat import ensure_vision_tokens

TESTS = Path(__file__).resolve().parent
SRC = TESTS.parent / "src"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return build_broken_corpus(tmp_path_factory.mktemp("lengths"))


def _reference(src, proc, tok, overhead=None) -> list[tuple[int, int]]:
    over, out = template_overhead(tok) if overhead is None else overhead, []
    for i in range(len(src)):
        try:
            out.append(estimate_lengths(src[i], proc, tok, over))
        except BadSample:
            out.append((0, 0))
    return out


def _processor(**kw):
    from cmpt.vision.processor import ImageProcessor

    return ImageProcessor(**{"patch_size": 14, "merge_size": 2, "min_pixels": 28 * 28, **kw})


def _parts(corpus):
    return LlavaSource(corpus.path), tiny_processor(), tiny_tokenizer()


def _count_opens(monkeypatch) -> list[int]:
    calls = [0]
    real = LS.Image.open

    def counting(*a, **kw):
        calls[0] += 1
        return real(*a, **kw)

    monkeypatch.setattr(LS.Image, "open", counting)
    return calls


@pytest.mark.parametrize("backend", ["serial", "thread", "process"])
def test_parallel_build_equals_serial_reference(corpus, backend):
    src, proc, tok = LlavaSource(corpus.path), tiny_processor(), tiny_tokenizer()
    ref = _reference(src, proc, tok)
    assert sum(1 for x in ref if x != (0, 0)) >= 8 and (0, 0) in ref  # good and broken records
    idx = LengthIndex.build(src, proc, tok, workers=2, chunk=4, backend=backend)
    assert idx.lengths == ref
    assert idx.how == "built" and idx.header_reads >= 8
    fixed = _processor(policy="fixed", fixed_size=56, max_pixels=56 * 56)
    assert LengthIndex.build(src, fixed, tok, workers=2, chunk=4, backend=backend).lengths == _reference(
        src, fixed, tok
    )


def test_fast_token_counts_match_the_tokenizer(corpus):
    tok = tiny_tokenizer()
    texts = ["Describe the chart.", "A red <|image_pad|> bar, 12 units!", "", "é ü 中文"]
    assert LI.count_tokens(tok, texts, fast=True) == LI.count_tokens(tok, texts)
    assert LS._fast_matches(tok, texts)


def test_cache_reused_by_a_reloaded_tokenizer_without_header_reads(corpus, tmp_path, monkeypatch):
    src, proc, tok = LlavaSource(corpus.path), tiny_processor(), tiny_tokenizer()
    first = LengthIndex.build(src, proc, tok, cache_dir=tmp_path, backend="serial")
    assert first.how == "built" and first.header_reads > 0
    files = list(tmp_path.glob("lengths-*.json"))
    assert len(files) == 1 and not list(tmp_path.glob("*.lock")) and not list(tmp_path.glob(".*tmp"))
    # stage 2 loads stage 1's saved tokenizer from another directory: same identity, same key
    from transformers import AutoTokenizer

    tok.save_pretrained(tmp_path / "stage1")
    again = AutoTokenizer.from_pretrained(tmp_path / "stage1")
    assert LC.tokenizer_identity(again) == LC.tokenizer_identity(tok)
    opens = _count_opens(monkeypatch)
    second = LengthIndex.build(LlavaSource(corpus.path), proc, again, cache_dir=tmp_path)
    assert second.how == "cached" and second.header_reads == 0 and opens[0] == 0
    assert second.lengths == first.lengths
    # a stage at another resolution: the same file, its own lengths, still no header read
    for other in (_processor(max_pixels=28 * 28 * 4), _processor(policy="fixed", fixed_size=56)):
        third = LengthIndex.build(src, other, tok, cache_dir=tmp_path)
        assert third.how == "cached" and third.header_reads == 0 and opens[0] == 0
        assert third.lengths == _reference(src, other, tok)
        opens[0] = 0  # the reference reads them
        assert third.lengths != first.lengths
    # a builder with its own text overhead (MoCa's plain text): the same file
    plain = LengthIndex.build(src, proc, tok, cache_dir=tmp_path, overhead=(0, 0))
    assert plain.how == "cached" and plain.lengths == _reference(src, proc, tok, (0, 0)) != first.lengths
    # another tokenizer: another file
    new_tok = train_tokenizer(default_corpus(100), vocab_size=300)
    ensure_vision_tokens(new_tok)
    assert LengthIndex.build(src, proc, new_tok, cache_dir=tmp_path).how == "built"
    assert len(list(tmp_path.glob("lengths-*.json"))) == 2


def test_cache_rebuilt_when_an_image_or_the_data_changes(tmp_path):
    corpus = build_broken_corpus(tmp_path / "data")
    proc, tok, cache = tiny_processor(), tiny_tokenizer(), tmp_path / "cache"

    def build() -> LengthIndex:
        return LengthIndex.build(LlavaSource(corpus.path), proc, tok, cache_dir=cache, backend="serial")

    base = build()
    assert build().how == "cached"
    img = corpus.root / "img" / "rgb.png"
    st = img.stat()
    os.utime(img, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # touched
    touched = build()
    assert touched.how == "built" and touched.header_reads > 0 and touched.lengths == base.lengths
    assert build().how == "cached"
    img.rename(img.with_suffix(".bak"))  # deleted: its records can no longer be estimated
    gone = build()
    g_rgb = len(base) - 8  # the first good record
    assert gone.how == "built" and gone.lengths[g_rgb] == (0, 0) != base.lengths[g_rgb]
    img.with_suffix(".bak").rename(img)  # back, with the size and mtime it had
    back = build()
    assert back.how == "built" and back.lengths == base.lengths
    (corpus.root / "img" / "nope.png").write_bytes(img.read_bytes())  # a missing image appears
    assert build().how == "built"
    with corpus.path.open("a") as fh:  # the data file changes: another key
        fh.write(json.dumps({"id": "new", "conversations": [{"from": "human", "value": "hi"}]}) + "\n")
    grown = build()
    assert grown.how == "built" and len(grown) == len(base) + 1


def test_length_cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("CMPT_CACHE", str(tmp_path))
    assert LC.length_cache_dir("") == tmp_path / "lengths"
    assert LC.length_cache_dir("off") is None
    assert LC.length_cache_dir("{cache}/mine") == tmp_path / "mine"


def test_stale_lock_of_a_dead_builder_is_broken(corpus, tmp_path):
    src, proc, tok = LlavaSource(corpus.path), tiny_processor(), tiny_tokenizer()
    LengthIndex.build(src, proc, tok, cache_dir=tmp_path)
    (path,) = tmp_path.glob("lengths-*.json")
    path.unlink()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    owner = {"host": socket.gethostname(), "pid": dead.pid, "time": 0}
    path.with_name(path.name + ".lock").write_text(json.dumps(owner))
    assert LengthIndex.build(src, proc, tok, cache_dir=tmp_path).how == "built"
    assert not path.with_name(path.name + ".lock").exists()


RACER = """
import json, logging, os, sys, time
logging.basicConfig(level=logging.INFO)
from cmpt.data import length_scan as LS
from cmpt.data.pipeline import LengthIndex
from cmpt.data.llava_source import LlavaSource
from transformers import AutoTokenizer
sys.path.insert(0, {tests!r})
from broken_corpus import tiny_processor
data, tok_dir, cache, out, go = sys.argv[1:6]
slow = LS._scan
def _scan(job, bounds):  # holds the lock until the test says go
    deadline = time.monotonic() + 120
    while go != "-" and not os.path.exists(go) and time.monotonic() < deadline:
        time.sleep(0.02)
    return slow(job, bounds)
LS._scan = _scan
idx = LengthIndex.build(
    LlavaSource(data), tiny_processor(), AutoTokenizer.from_pretrained(tok_dir), cache_dir=cache,
    backend="serial", chunk=8,
)
json.dump({{"how": idx.how, "reads": idx.header_reads, "lengths": idx.lengths}}, open(out, "w"))
"""


def test_two_processes_build_it_once(corpus, tmp_path):
    tiny_tokenizer().save_pretrained(tmp_path / "tok")
    script = tmp_path / "racer.py"
    script.write_text(RACER.format(tests=str(TESTS)))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), str(TESTS)]), "OMP_NUM_THREADS": "1"}
    cache, go = tmp_path / "cache", tmp_path / "go"

    def start(name: str, go: str, **kw) -> subprocess.Popen:
        args = [corpus.path, tmp_path / "tok", cache, tmp_path / f"{name}.json", go]
        return subprocess.Popen([sys.executable, str(script), *map(str, args)], env=env, **kw)

    first = start("a", str(go))
    deadline = time.monotonic() + 120
    while not list(cache.glob("*.lock")) and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)  # the first holds the lock
    second = start("b", "-", stderr=subprocess.PIPE, text=True)
    log = []
    for line in second.stderr:  # the second waits for the first's file ...
        log.append(line)
        if "waiting for another process building the length index" in line:
            break
    go.touch()  # ... which the first now builds
    log.append(second.communicate(timeout=180)[1])
    assert first.wait(180) == 0 and second.returncode == 0, "".join(log)
    assert any("waiting for another process" in line for line in log), "".join(log)
    a, b = (json.loads((tmp_path / f"{n}.json").read_text()) for n in "ab")
    assert (a["how"], b["how"]) == ("built", "cached") and b["reads"] == 0
    assert a["lengths"] == b["lengths"] == [list(x) for x in _reference(*_parts(corpus))]


def test_first_step_message():
    class Loader:
        def __init__(self) -> None:
            self.length_index = {"seconds": 1.234, "how": "cached", "records": 20}

    msg = LC.first_step_message(Loader())
    assert msg.startswith("time to first step: ") and "length index: 1.23 s, cached, 20 records" in msg
    assert 0 < LC.process_age_s() < 24 * 3600
    assert "length index" not in LC.first_step_message(object())


RANKS = """
import json, sys
import torch.distributed as dist
sys.path.insert(0, {tests!r})
from broken_corpus import tiny_processor, tiny_tokenizer
from cmpt.data.loader import build_loader
from cmpt.data.config import DataConfig
dist.init_process_group("gloo")
out, data, cache = sys.argv[1:4]
cfg = DataConfig(path=data, vision_budget=64, text_budget=512, max_samples_per_batch=2)
r, w = dist.get_rank(), dist.get_world_size()
loader = build_loader(cfg, tiny_processor(), tiny_tokenizer(), rank=r, world_size=w, cache_dir=cache)
info = dict(loader.length_index, lengths=loader.batcher.lengths.tolist())
json.dump(info, open(f"{{out}}/rank{{r}}.json", "w"))
dist.barrier()
dist.destroy_process_group()
"""


@pytest.mark.slow
def test_two_ranks_build_it_once(corpus, tmp_path):
    script = tmp_path / "ranks.py"
    script.write_text(RANKS.format(tests=str(TESTS)))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1"]
    cmd += [f"--master_port={port}", str(script), str(tmp_path), str(corpus.path), str(tmp_path / "cache")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for attempt in ("built", "cached"):
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
        assert (r0["how"], r1["how"]) == (attempt, "received")
        assert r0["records"] == r1["records"] == len(LlavaSource(corpus.path))
        assert r0["lengths"] == r1["lengths"] == [list(x) for x in _reference(*_parts(corpus))]
    assert len(list((tmp_path / "cache").glob("lengths-*.json"))) == 1


@pytest.mark.slow
def test_second_stage_reuses_the_index_and_logs_time_to_first_step(tmp_path, caplog):
    from cmpt.recipes import run_recipe
    from comp_fixtures import make_tiny_setup, overrides

    setup = make_tiny_setup(tmp_path / "tiny")
    common = {"data.length_cache": tmp_path / "lengths", "train.progress": False}
    with caplog.at_level("INFO", logger="cmpt.train"):
        run_recipe("tiny/comp_stage1", overrides(setup, tmp_path / "s1", steps=1, **common))
        first = [r.getMessage() for r in caplog.records if "time to first step" in r.getMessage()]
        caplog.clear()
        common["model.init"] = tmp_path / "s1" / "final"
        run_recipe("tiny/comp_stage2", overrides(setup, tmp_path / "s2", steps=1, **common))
        second = [r.getMessage() for r in caplog.records if "time to first step" in r.getMessage()]
    assert len(first) == 1 and ", built, 16 records" in first[0], first
    assert len(second) == 1 and ", cached, 16 records" in second[0], second
    assert len(list((tmp_path / "lengths").glob("lengths-*.json"))) == 1


def test_unusable_cache_directory_builds_without_it(corpus, tmp_path):
    src, proc, tok = _parts(corpus)
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("")
    idx = LengthIndex.build(src, proc, tok, cache_dir=not_a_dir)
    assert idx.how == "built" and idx.lengths == _reference(src, proc, tok)


def test_unused_cache_files_are_pruned(corpus, tmp_path):
    old = tmp_path / "lengths-0123456789abcdef0123.json"
    old.write_text("{}")
    os.utime(old, (time.time() - 40 * 86400,) * 2)
    LengthIndex.build(*_parts(corpus), cache_dir=tmp_path)
    assert not old.exists() and len(list(tmp_path.glob("lengths-*.json"))) == 1


def test_tokenizer_identity_tells_added_tokens_apart():
    """Two tokenizers of the same size whose one added token differs count tokens differently
    ("<a>" is one token for the first, several for the second): their identities differ, so the
    cache of one is never read for the other."""
    a, b = (
        train_tokenizer(default_corpus(50), vocab_size=120),
        train_tokenizer(default_corpus(50), vocab_size=120),
    )
    a.add_tokens(["<a>"], special_tokens=True)
    b.add_tokens(["<b>"], special_tokens=True)
    assert len(a) == len(b) and len(a("<a>")["input_ids"]) != len(b("<a>")["input_ids"])
    assert LC.tokenizer_identity(a) != LC.tokenizer_identity(b)
    assert LC.tokenizer_identity(a) == LC.tokenizer_identity(a)
