"""Sample building, collation, length index and the resumable loader (docs/method.md §2, §4)."""

from __future__ import annotations

import itertools
import json
import random

import pytest
import torch

from broken_corpus import conv, noise, tiny_processor, tiny_tokenizer
from cmpt.data.batching import BatchLoader, TokenBudgetBatcher
from cmpt.data.llava_source import LlavaSource
from cmpt.data.pipeline import LengthIndex, ProcessedSample, SampleBuilder, collate, sample_seed
from cmpt.data.sources import BadSample
from cmpt.vlm.chat import IGNORE_INDEX, IMAGE_PAD, caption_ids

ANSWERS = ("A red circle.", "Two blue squares.", "The largest bar is green.")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipe")
    (root / "img").mkdir()
    rows = []
    for i in range(14):
        noise(30 + 13 * i, 60 - 2 * i, seed=i).save(root / "img" / f"{i}.png")
        if i % 5 == 4:
            rows.append({"id": f"t{i}", "conversations": conv("Tell me something.", *ANSWERS[: 1 + i % 3])})
        elif i % 5 == 3:
            q = "<image>\nAnd <image>: which is bigger?"
            rows.append({"id": f"m{i}", "image": [f"img/{i}.png", "img/0.png"], "conversations": conv(q)})
        else:
            rows.append(
                {
                    "id": f"s{i}",
                    "image": f"img/{i}.png",
                    "conversations": conv("<image>\nDescribe.", *ANSWERS),
                }
            )
    (root / "data.json").write_text(json.dumps(rows))
    return root / "data.json"


@pytest.fixture(scope="module")
def parts(corpus):
    src, proc, tok = LlavaSource(corpus), tiny_processor(), tiny_tokenizer()
    return src, proc, tok, LengthIndex.build(src, proc, tok)


def _builder(proc, tok, **kw) -> SampleBuilder:
    return SampleBuilder(proc, tok, **{"max_text_tokens": 512, "caption_max_tokens": 64, "seed": 3, **kw})


def _loader(parts, num_workers=0, rank=0, world_size=1, **kw) -> BatchLoader:
    src, proc, tok, index = parts
    batcher = TokenBudgetBatcher(index.lengths, 40, 400, 3, seed=5, **kw)
    return BatchLoader(
        src, _builder(proc, tok), batcher, rank=rank, world_size=world_size, num_workers=num_workers,
    )  # fmt: skip


def _equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        torch.equal(a[k], b[k]) if isinstance(a[k], torch.Tensor) else a[k] == b[k] for k in a
    )


def test_collate_packs_samples_back_to_back(parts):
    src, proc, tok, _ = parts
    builder = _builder(proc, tok)
    samples = [builder.build(src[i], epoch=0) for i in (0, 3, 4, 1)]  # single, multi, text-only, single
    batch = collate(samples)
    lengths = [len(s.input_ids) for s in samples]
    assert batch["cu_seqlens"].tolist() == [0, *torch.tensor(lengths).cumsum(0).tolist()]
    assert batch["cu_seqlens"].dtype == torch.int32
    assert torch.equal(batch["input_ids"], torch.cat([s.input_ids for s in samples]))
    assert torch.equal(batch["labels"], torch.cat([s.labels for s in samples]))  # not shifted
    assert batch["num_tokens"] == sum(lengths) == batch["input_ids"].numel()  # no padding at all
    assert batch["patches"].dtype == torch.float32 and batch["patches"].shape[1] == 3 * 14 * 14
    grid = batch["grid_hw"]
    assert grid.shape == (4, 2) and batch["images_per_sample"].tolist() == [1, 2, 0, 1]
    n = int(grid.prod(1).sum())
    assert batch["patches"].shape[0] == n
    pad_id = tok.convert_tokens_to_ids(IMAGE_PAD)
    assert int((batch["input_ids"] == pad_id).sum()) == n // 4 == batch["num_vision_tokens"]
    # supervised positions after a shift inside each sequence (a sequence's first label predicts nothing)
    assert batch["num_loss_tokens"] == sum(int((s.labels[1:] != IGNORE_INDEX).sum()) for s in samples) > 0
    cap_lens = batch["caption_cu_seqlens"].diff().tolist()
    assert cap_lens == [len(s.caption_ids) for s in samples] and cap_lens[2] == 0
    assert torch.equal(batch["caption_ids"], torch.cat([s.caption_ids for s in samples]))
    assert batch["num_align"] == 3 and batch["num_samples"] == 4 and batch["num_bad"] == 0
    assert batch["sample_ids"] == ["s0", "m3", "t4", "s1"]
    for k in ("input_ids", "labels", "grid_hw", "images_per_sample", "caption_ids"):
        assert batch[k].dtype == torch.long, k


def test_text_only_batch_has_empty_patches(parts):
    src, proc, tok, _ = parts
    batch = collate([_builder(proc, tok).build(src[4])])
    assert batch["patches"].shape == (0, 3 * 14 * 14) and batch["grid_hw"].shape == (0, 2)
    assert batch["num_align"] == 0 and batch["caption_cu_seqlens"].tolist() == [0, 0]


def test_caption_shuffle_is_deterministic_per_seed_epoch_id(parts):
    src, proc, tok, _ = parts
    rec = src[0]
    a, b = _builder(proc, tok), _builder(proc, tok)
    caps = [a.build(rec, epoch=e).caption_ids.tolist() for e in range(6)]
    assert caps == [b.build(rec, epoch=e).caption_ids.tolist() for e in range(6)]
    assert len({tuple(c) for c in caps}) > 1  # the order changes with the epoch
    for e in range(6):
        answers = list(ANSWERS)
        random.Random(sample_seed(3, e, rec.id)).shuffle(answers)
        assert caps[e] == caption_ids(" ".join(answers), tok, 64).tolist()
    fixed = _builder(proc, tok, shuffle_caption=False).build(rec, epoch=1)
    assert fixed.caption_ids.tolist() == caption_ids(" ".join(ANSWERS), tok, 64).tolist()
    assert sample_seed(3, 0, "x") == 14910240933362401883  # sha256-based: stable across processes and runs


def test_builder_truncates_and_rejects(parts, tmp_path):
    src, proc, tok, _ = parts
    short = _builder(proc, tok, max_text_tokens=30).build(src[4])
    assert short.truncated and len(short.input_ids) == 30
    with pytest.raises(BadSample) as e:
        _builder(proc, tok, max_text_tokens=10).build(src[0])  # the image would be cut
    assert e.value.reason == "too_long" and e.value.id == "s0"
    rec = src[0]
    rec.images = ["img/missing.png"]
    with pytest.raises(BadSample, match="missing_image"):
        _builder(proc, tok).build(rec)


def test_length_index_estimates_and_cache(parts, corpus, tmp_path):
    src, proc, tok, index = parts
    builder = _builder(proc, tok, max_text_tokens=4096)
    for i in range(len(src)):
        s = builder.build(src[i])
        v, t = index[i]
        assert v == sum(s.num_image_tokens)  # exact: header size + smart_resize
        assert abs(t - len(s.input_ids)) <= 3, (i, t, len(s.input_ids))
    cached = LengthIndex.build(src, proc, tok, cache_dir=tmp_path)
    files = list(tmp_path.glob("lengths-*.json"))
    assert len(files) == 1 and cached.lengths == index.lengths
    data = json.loads(files[0].read_text())
    k = max(range(len(index)), key=lambda j: index[j][0])  # the record with the most vision tokens
    data["records"][k][0] += 100  # prove the second build reads the cache: 100 more content tokens
    files[0].write_text(json.dumps(data))
    v, t = index[k]
    assert LengthIndex.build(src, proc, tok, cache_dir=tmp_path)[k] == (v, t + 100)
    other = tiny_processor()
    other.max_pixels = 28 * 28 * 4
    v2, t2 = LengthIndex.build(src, other, tok, cache_dir=tmp_path)[k]  # another resolution: same file
    assert v2 < v and t2 == t + 100 - (v - v2)
    assert len(list(tmp_path.glob("lengths-*.json"))) == 1


def test_loader_workers_give_identical_batches(parts):
    ref = list(itertools.islice(_loader(parts), 12))  # more than one epoch
    assert {b["sample_ids"][0] for b in ref}
    got = list(itertools.islice(_loader(parts, num_workers=2), 12))
    assert all(_equal(a, b) for a, b in zip(ref, got, strict=True))


def test_resume_mid_stream(parts):
    a = _loader(parts, num_workers=2)
    it = iter(a)
    for _ in range(4):
        next(it)  # workers prefetch ahead: the state must count only what was consumed
    state = a.state_dict()
    expected = [next(it) for _ in range(8)]
    for workers in (0, 2):
        b = _loader(parts, num_workers=workers)
        b.load_state_dict(state)
        assert all(_equal(x, y) for x, y in zip(expected, itertools.islice(b, 8), strict=True))


def test_ranks_are_disjoint_and_in_step(parts):
    loaders = [_loader(parts, rank=r, world_size=2) for r in range(2)]
    n = len(loaders[0].batcher.epoch_batches(0)) // 2
    assert n >= 2
    per_rank = [list(itertools.islice(ld, n)) for ld in loaders]  # one epoch
    ids = [{i for b in batches for i in b["sample_ids"]} for batches in per_rank]
    assert not ids[0] & ids[1]
    assert loaders[0].state_dict() == loaders[1].state_dict()
    assert loaders[0].state_dict()["position"] == 2 * n and loaders[0].epoch == 0


def test_bad_samples_are_skipped_and_carried(parts, tmp_path):
    _, proc, tok, _ = parts
    rows = [{"id": "ok1", "conversations": conv("Hi", "Yes.")}]
    rows += [{"id": f"bad{i}", "image": "nope.png", "conversations": conv()} for i in range(2)]
    rows += [{"id": "ok2", "conversations": conv("Hello", "No.")}]
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    bad_src = LlavaSource(path)
    batcher = TokenBudgetBatcher(LengthIndex.build(bad_src, proc, tok).lengths, 64, 512, 1, shuffle=False)
    loader = BatchLoader(bad_src, _builder(proc, tok), batcher)
    first, second = itertools.islice(loader, 2)
    assert (first["sample_ids"], first["num_bad"]) == (["ok1"], 0)
    assert (second["sample_ids"], second["num_bad"]) == (["ok2"], 2)  # two all-bad micro-batches skipped
    assert loader.state_dict()["position"] == 4 and loader.bad_seen == 2


def test_reiterating_a_loader_continues_where_the_caller_stopped(parts):
    ref = list(itertools.islice(_loader(parts), 7))
    loader = _loader(parts, num_workers=2)
    got = list(itertools.islice(loader, 3))  # workers have prefetched further
    got += list(itertools.islice(loader, 4))  # a new iterator on the same persistent workers
    assert all(_equal(a, b) for a, b in zip(ref, got, strict=True))


def test_resume_with_another_world_size(parts):
    two = _loader(parts, rank=0, world_size=2)
    next(iter(two))
    state = two.state_dict()
    assert state["position"] == 2 and state["world_size"] == 2
    one = _loader(parts)
    one.load_state_dict(state)  # global position: the single process continues at micro-batch 2
    batch = next(iter(one))
    expected = [parts[0][i].id for i in one.batcher.epoch_batches(0)[2]]
    assert batch["sample_ids"] == expected


def test_build_loader_from_config(corpus, tmp_path):
    import pickle

    from cmpt.data.config import DataConfig, ResolutionConfig
    from cmpt.data.loader import build_loader

    proc = ResolutionConfig(min_pixels=28 * 28, max_pixels=28 * 28 * 16).make_processor()
    cfg = DataConfig(path=str(corpus), vision_budget=40, text_budget=400, max_samples_per_batch=3)
    loader = build_loader(cfg, proc, tiny_tokenizer(), cache_dir=tmp_path)
    batch = next(iter(loader))
    assert batch["num_samples"] >= 1 and list(tmp_path.glob("lengths-*.json"))
    assert len(pickle.loads(pickle.dumps(loader.source))) == 14  # workers may be spawned
    with pytest.raises(ValueError, match="oversize"):
        DataConfig(oversize="drop")
    from cmpt.demo.tiny_lm import default_corpus, train_tokenizer

    with pytest.raises(ValueError, match="ensure_vision_tokens"):
        SampleBuilder(proc, train_tokenizer(default_corpus(50), vocab_size=300))


def test_num_loss_tokens_counts_the_shifted_targets():
    """Labels [5, 6, -100, 7] supervise positions 0 and 2 after the shift (targets 6 and 7): 2,
    not the 3 labels that are not ignored."""
    empty = torch.zeros(0, dtype=torch.long)
    ids, labels = torch.tensor([1, 2, 3, 4]), torch.tensor([5, 6, -100, 7])
    s = ProcessedSample("a", torch.zeros(0, 12), [], ids, labels, empty)
    assert collate([s])["num_loss_tokens"] == 2
