"""Mixture YAML: sampling strategies, weights, reproducibility, tar mixtures and exact resume
(docs/method.md §4)."""

from __future__ import annotations

import collections
import itertools

import numpy as np
import pytest
import torch
import yaml

from broken_corpus import tiny_processor, tiny_tokenizer
from cmpt.data.batching import TokenBudgetBatcher
from cmpt.data.config import DataConfig
from cmpt.data.convert import llava_to_wds
from cmpt.data.llava_source import LlavaSource
from cmpt.data.loader import build_loader
from cmpt.data.mixture import MixtureSource, load_mixture, parse_sampling, select_indices, weighted
from cmpt.data.open import source_kind
from cmpt.data.pipeline import LengthIndex
from cmpt.data.webdataset import ShardList
from cmpt.demo.synthetic import generate


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("mix")
    a = generate("scenes", 12, root, seed=0, split="a")
    b = generate("scenes", 10, root, seed=1, split="b")
    wds = llava_to_wds(b, root / "b_wds", samples_per_shard=2)
    return {"root": root, "a": a, "b": b, "b_wds": wds["pattern"]}


def _yaml(root, name, datasets, seed=0):
    path = root / name
    path.write_text(yaml.safe_dump({"seed": seed, "datasets": datasets}))
    return path


def _ids(src):
    return [src[i].id for i in range(len(src))]


def test_sampling_strategies_select_the_right_records(data):
    assert parse_sampling("random:12.5%") == ("percent", 12.5) and parse_sampling(" first:3") == ("first", 3)
    for bad in ("some", "first:", "random:0%", "random:120%", "last:3"):
        with pytest.raises(ValueError):
            parse_sampling(bad)
    ids_a = _ids(LlavaSource(data["a"]))
    root = data["root"]
    first = load_mixture(_yaml(root, "f.yaml", [{"path": "a.json", "sampling": "first:5"}]))
    assert _ids(first) == ids_a[:5]
    assert _ids(load_mixture(_yaml(root, "all.yaml", [{"path": "a.json"}]))) == ids_a
    runs = {}
    for name, seed, spec in (
        ("r1", 0, "random:5"),
        ("r2", 0, "random:5"),
        ("r3", 1, "random:5"),
        ("p", 0, "random:50%"),
    ):
        runs[name] = _ids(
            load_mixture(_yaml(root, f"{name}.yaml", [{"path": "a.json", "sampling": spec}], seed))
        )
    assert runs["r1"] == runs["r2"] != runs["r3"]  # reproducible by seed
    assert len(runs["r1"]) == 5 and len(set(runs["r1"])) == 5 and set(runs["r1"]) <= set(ids_a)
    assert runs["r1"] == sorted(runs["r1"]) and len(runs["p"]) == 6  # file order; round(50% of 12)
    assert len(select_indices(12, "first:100", np.random.default_rng(0))) == 12  # capped


def test_weights_give_the_proportions(data):
    idx, copies = weighted(np.arange(10), 2.5, np.random.default_rng(0))
    assert len(idx) == 25 and collections.Counter(copies.tolist()) == {0: 10, 1: 10, 2: 5}
    path = _yaml(data["root"], "w.yaml", [
        {"path": "a.json", "weight": 2, "id_prefix": "A/"},
        {"path": "b.json", "sampling": "first:8", "weight": 0.5, "id_prefix": "B/"},
    ])  # fmt: skip
    mix = load_mixture(path)
    assert isinstance(mix, MixtureSource) and mix.member_counts() == [24, 4]
    ids = _ids(mix)
    assert len(set(ids)) == len(ids) == 28  # repeats get "#k": ids stay unique
    assert sum(i.endswith("#1") for i in ids) == 12 and all(i.startswith(("A/", "B/")) for i in ids)
    assert _ids(load_mixture(path)) == ids  # reproducible
    # empirical proportions over several epochs of the token-budget batcher
    lengths = LengthIndex.build(mix, tiny_processor(), tiny_tokenizer()).lengths
    batcher = TokenBudgetBatcher(lengths, 40, 4000, 4, seed=3)
    counts = collections.Counter(
        mix.member[i] for e in range(3) for mb in batcher.epoch_batches(e) for i in mb
    )  # fmt: skip
    assert counts[0] / (counts[0] + counts[1]) == pytest.approx(24 / 28, abs=0.02)
    assert counts[0] == 3 * 24 and counts[1] == 3 * 4


def test_mixture_of_json_and_hf_resumes_exactly(data, tmp_path):
    pytest.importorskip("datasets")
    from cmpt.data.convert import llava_to_hf

    hf = llava_to_hf(data["b"], data["root"] / "b_hf", format="parquet")
    path = _yaml(data["root"], "m.yaml", [
        {"path": "a.json", "sampling": "random:8", "weight": 1.5},
        {"path": hf["path"], "weight": 1},
    ])  # fmt: skip
    assert source_kind(path) == "mixture"
    proc, tok = tiny_processor(), tiny_tokenizer()
    cfg = DataConfig(path=str(path), vision_budget=40, text_budget=4000, max_samples_per_batch=3, seed=2)
    a = build_loader(cfg, proc, tok, cache_dir=tmp_path)
    assert len(a.source) == 12 + 10
    it = iter(a)
    for _ in range(5):
        next(it)
    state = a.state_dict()
    expected = [next(it) for _ in range(6)]  # crosses into epoch 1
    b = build_loader(cfg, proc, tok, cache_dir=tmp_path)
    b.load_state_dict(state)
    for x, y in zip(expected, itertools.islice(b, 6), strict=True):
        assert x["sample_ids"] == y["sample_ids"]
        assert all(torch.equal(x[k], y[k]) for k in ("input_ids", "patches", "caption_ids"))


def test_tar_mixtures_are_streams_and_mix_with_map_style(data):
    root = data["root"]
    mix = load_mixture(_yaml(root, "t.yaml", [{"path": data["b_wds"], "weight": 2}]))
    assert isinstance(mix, ShardList) and len(mix) == 10 and mix.paths[:5] == mix.paths[5:]
    half = load_mixture(_yaml(root, "t2.yaml", [{"path": data["b_wds"], "weight": 0.4}]))
    assert len(half) == 2 and set(half.paths) <= set(mix.paths)
    cfg = DataConfig(path=str(root / "t.yaml"), vision_budget=40, text_budget=4000, max_samples_per_batch=2)
    loader = build_loader(cfg, tiny_processor(), tiny_tokenizer())
    assert type(loader).__name__ == "StreamingLoader" and next(iter(loader))["num_samples"] >= 1
    both = load_mixture(_yaml(root, "x.yaml", [{"path": "a.json"}, {"path": data["b_wds"]}]))
    assert isinstance(both, MixtureSource) and len(both) == 12 + 10  # tar shards indexed by offset
    b = LlavaSource(data["b"])
    assert [both[12 + i].conversations for i in range(10)] == [b[i].conversations for i in range(10)]
    with pytest.raises(ValueError, match="sampling: all"):
        load_mixture(_yaml(root, "y.yaml", [{"path": data["b_wds"], "sampling": "first:3"}]))
    with pytest.raises(ValueError, match="unknown key"):
        load_mixture(_yaml(root, "z.yaml", [{"path": "a.json", "weigth": 2}]))
    with pytest.raises(ValueError, match="weight"):
        load_mixture(_yaml(root, "w0.yaml", [{"path": "a.json", "weight": 0}]))
