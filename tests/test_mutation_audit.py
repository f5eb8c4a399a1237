"""Behaviours that a mutation audit of the suite found untested (2026-12-01): each test pins one,
named by the module and line it guards in its docstring, and fails when that line is mutated
(a flipped comparison, a dropped term, a wrong index). Expected values come from hand calculations
or plain-loop references, never from the code under test. Tests of behaviours that already had a
home live there; these are the ones spread over data, eval, recipes and training helpers."""

from __future__ import annotations

import io
import json
import math
import tarfile
from types import SimpleNamespace
from typing import ClassVar

import numpy as np
import pytest
import torch

from broken_corpus import conv, noise, tiny_processor, tiny_tokenizer


# ============================================================================ eval/resolution.py
def _point(**kw):
    return {"mean_vision_tokens": 4.0, "score": 0.5, "n": 3, **kw}


def test_sweep_table_names_the_requested_max_pixels():
    """resolution.py:64: with a fixed-resolution processor the row shows what was asked for."""
    from cmpt.eval.resolution import sweep_table

    table = sweep_table(
        [_point(requested_max_pixels=3136, max_pixels=50176, fixed_resolution="224x224")], "acc"
    )
    row = table.splitlines()[2]
    assert row.startswith("| 3136 | 224x224 (fixed) |"), row


def test_sweep_table_side_is_the_square_root():
    """resolution.py:77: the ≈ side column is round(√max_pixels)."""
    from cmpt.eval.resolution import sweep_table

    table = sweep_table([_point(max_pixels=3136), _point(max_pixels=50176)], "acc")
    rows = table.splitlines()[2:4]
    assert rows[0].startswith("| 3136 | 56² |") and rows[1].startswith("| 50176 | 224² |"), rows


# ============================================================================ eval/retrieval.py
def test_text_to_image_recall_uses_the_transposed_similarity():
    """retrieval.py:49: t2i ranks images per caption (columns of the images × captions matrix)."""
    from cmpt.eval.retrieval import retrieval_scores

    sim = torch.tensor([[1.0, 0.0], [2.0, 3.0]])  # rows: images, columns: captions
    r = retrieval_scores(sim, ["a", "b"])
    # i2t: image0 → cap0 (1 > 0) hit; image1 → cap1 (3 > 2) hit
    # t2i: cap0 → images (1, 2): image1 wins → miss; cap1 → images (0, 3): image1 → hit
    assert r["i2t"]["R@1"] == 1.0
    assert r["t2i"]["R@1"] == 0.5
    assert r["mean_recall"] == pytest.approx((3 * 1.0 + 0.5 + 1.0 + 1.0) / 6)


def test_retrieval_records_with_two_images(tmp_path):
    """retrieval.py:67: a record's features pool the tokens of *all* its images."""
    from PIL import Image

    from cmpt.eval.retrieval import retrieval_eval
    from test_eval_retrieval import FakeRetrievalModel, N

    recs = []
    for k in range(N):
        Image.new("RGB", (56 + 28 * (k % 3), 56), (20 * k + 10,) * 3).save(tmp_path / f"{k}.png")
        Image.new("RGB", (56, 56), (20 * k + 10,) * 3).save(tmp_path / f"{k}b.png")
        c = [
            {"from": "human", "value": "<image>\n<image>\nDescribe."},
            {"from": "gpt", "value": f"caption {k}"},
        ]
        recs.append({"id": str(k), "images": [f"{k}.png", f"{k}b.png"], "conversations": c})
    (tmp_path / "test.json").write_text(json.dumps(recs))
    r = retrieval_eval(FakeRetrievalModel(), tmp_path, batch_size=5)
    assert r["n"] == N and r["i2t"]["R@1"] == 1.0 and r["t2i"]["R@1"] == 1.0


# ============================================================================ eval/metrics.py (seg)
def test_confusion_matrix_rows_are_labels():
    """metrics.py:322: rows = label, columns = prediction (its docstring)."""
    from cmpt.eval.metrics import confusion_matrix

    pred = np.array([1, 1, 0, 255 % 2])
    label = np.array([0, 0, 0, 255])  # the last pixel is ignored
    conf = confusion_matrix(pred, label, 2)
    assert conf.tolist() == [[1, 2], [0, 0]]


# ============================================================================ eval/probe.py
def test_standardize_uses_the_train_statistics_for_val():
    """probe.py:64: val features are standardized with the *train* mean/std (DINOv2 protocol)."""
    from cmpt.eval.probe import _standardize

    train = torch.tensor([[0.0], [2.0]])  # mean 1, population std 1
    val = torch.tensor([[4.0], [5.0]])
    tr, va = _standardize(train, val)
    assert tr.flatten().tolist() == [-1.0, 1.0]
    assert va.flatten().tolist() == [3.0, 4.0]


def test_probe_classes_are_the_union_of_train_and_val(tmp_path):
    """probe.py:152: a val label never seen in train is still a class (counted, scored as wrong)."""
    from cmpt.eval.probe import linear_probe
    from test_eval_probe import colour_split, tiny_vit

    train = colour_split(tmp_path, "train", 6, 0)
    val = colour_split(tmp_path, "val", 3, 1)
    recs = json.loads(val.read_text())
    recs[0]["meta"]["label"] = 7  # a class only val has
    val.write_text(json.dumps(recs))
    r = linear_probe(tiny_vit(True), train, val, lrs=(0.1,), epochs=2, feature_grid=(("cls", "last"),))
    assert r["num_classes"] == 4 and r["classes"] == [0, 1, 2, 7] and r["chance"] == 0.25


# ============================================================================ data/mixture.py
def test_percent_sampling_rounds_to_nearest():
    """mixture.py:129: ``random:P%`` draws ``round(P/100 · n)`` records (25 % of 7 = 1.75 → 2)."""
    from cmpt.data.mixture import select_indices

    idx = select_indices(7, "random:25%", np.random.default_rng(0))
    assert len(idx) == 2 and list(idx) == sorted(idx) and len(set(idx.tolist())) == 2
    assert len(select_indices(5, "random:70%", np.random.default_rng(0))) == 4  # 3.5 → 4 (half to even)


# ============================================================================ data/check.py
def test_report_keeps_two_records_with_one_id_apart():
    """check.py:37: ids may repeat in a dataset; bad samples are told apart by their index."""
    from cmpt.data.check import Report
    from cmpt.data.validate import Problem

    rep = Report(3, [Problem("a", "missing_image", "", 0), Problem("a", "empty_text", "", 2)])
    assert rep.num_bad == 2 and [idx for _, idx, _ in rep.bad_samples()] == [0, 2]


def test_report_fraction_counts_samples_not_problems():
    """check.py:57: one sample with two problems is one bad sample of four (25 %)."""
    from cmpt.data.check import Report
    from cmpt.data.validate import Problem

    rep = Report(4, [Problem("a", "missing_image", "", 0), Problem("a", "empty_text", "", 0)])
    assert rep.summary().splitlines()[0] == "4 records, 1 bad (25.00%)"


# ============================================================================ data/webdataset.py
def test_descending_unpadded_brace_range_is_not_padded():
    """webdataset.py:90: zero padding is kept only when the first bound is padded."""
    from cmpt.data.webdataset import expand_braces

    assert expand_braces("s{10..8}.tar") == ["s10.tar", "s9.tar", "s8.tar"]
    assert expand_braces("s{08..10}.tar") == ["s08.tar", "s09.tar", "s10.tar"]


def test_image_entry_needs_key_and_dot_to_be_stripped():
    """webdataset.py:141: only a leading ``"<key>."`` is stripped from an image entry; ``"kz0.png"``
    of key ``k`` names no member, so with two image members for one path it is ``missing_image``."""
    from cmpt.data.sources import BadSample
    from cmpt.data.webdataset import RawSample, decode_sample

    obj = {"id": "x", "images": ["kz0.png"], "conversations": conv()}
    members = {"json": json.dumps(obj).encode(), "0.png": b"a", "1.png": b"b"}
    with pytest.raises(BadSample) as e:
        decode_sample(RawSample("k", members), "s.tar")
    assert e.value.reason == "missing_image"
    ok = dict(members, json=json.dumps({**obj, "images": ["k.1.png"]}).encode())
    assert decode_sample(RawSample("k", ok), "s.tar").images == [b"b"]


def test_shard_records_are_numbered_across_shards(tmp_path):
    """webdataset.py:278: ``iter_records`` gives every sample its position in the read."""
    from cmpt.data.convert import write_tar_samples
    from cmpt.data.webdataset import ShardList

    for s in range(2):
        samples = [
            (f"{s}{i}", {"json": json.dumps({"id": f"{s}-{i}", "conversations": conv()}).encode()})
            for i in range(3)
        ]
        write_tar_samples(str(tmp_path / f"p-{s}.tar"), samples)
    recs = list(ShardList(str(tmp_path / "p-{0..1}.tar")).iter_records())
    assert [r.id for r in recs] == ["0-0", "0-1", "0-2", "1-0", "1-1", "1-2"]
    assert [r.index for r in recs] == [0, 1, 2, 3, 4, 5]


# ============================================================================ data/documents.py
def test_protected_ids_include_pad_even_when_not_special():
    """documents.py:118: pad/eos/bos/unk are protected whether or not the tokenizer lists them special."""
    from cmpt.data.documents import protected_token_ids

    class Tok:
        all_special_ids: ClassVar[list[int]] = []
        added_tokens_decoder: ClassVar[dict] = {}
        pad_token_id, eos_token_id, bos_token_id, unk_token_id = 7, 9, None, None

        def encode(self, text, add_special_tokens=False):
            return []

    assert protected_token_ids(Tok()) == [7, 9]


# ============================================================================ data/pairs.py
def _pair(meta):
    from cmpt.data.sources import Record

    return Record("p1", [], None, meta)


def test_missing_hard_negatives_repeat_the_last_one():
    """pairs.py:302: with fewer than k negatives the *last* one fills the remaining slots."""
    from cmpt.data.pairs import PairBuilder
    from cmpt.vlm.chat import encode_text_with_images

    tok = tiny_tokenizer()
    b = PairBuilder(tiny_processor(), tok, num_hard_negatives=3)
    s = b.build(
        _pair({"qry": "a query", "pos_text": "the answer", "neg_text": ["red circle", "blue square"]})
    )
    first, last = (encode_text_with_images(t, tok, []) for t in ("red circle", "blue square"))
    assert not torch.equal(first, last)
    got = [n.input_ids for n in s.negatives]
    assert torch.equal(got[0], first) and torch.equal(got[1], last) and torch.equal(got[2], last)
    assert s.neg_valid == [True, True, True]


def test_negative_entries_without_text_or_image_are_ignored():
    """pairs.py:169: MMEB-train writes "" for "no negative"; such entries are dropped."""
    from cmpt.data.pairs import pair_fields

    f = pair_fields(_pair({"qry": "q", "pos_text": "p", "neg_text": ["wrong", ""], "neg_image_path": None}))
    assert [n.text for n in f.negatives] == ["wrong"]


# ============================================================================ data/vocab_prior.py
def test_caption_text_skips_empty_answers():
    """vocab_prior.py:186: blank answers add no separator (no leading / doubled spaces)."""
    from cmpt.data.vocab_prior import caption_texts_from_llava

    recs = [
        {"conversations": [{"from": "gpt", "value": "  "}, {"from": "gpt", "value": "hello"}]},
        {
            "conversations": [
                {"from": "gpt", "value": "a"},
                {"from": "gpt", "value": ""},
                {"from": "gpt", "value": "b"},
            ]
        },
    ]
    assert list(caption_texts_from_llava(recs)) == ["hello", "a b"]


# ============================================================================ data/length_cache.py
def test_cached_index_with_another_record_count_is_rebuilt(tmp_path):
    """length_cache.py:130: a cache file whose key matches but whose record count does not is rebuilt."""
    from cmpt.data import length_cache as LC

    path = tmp_path / "lengths-x.json"
    path.write_text(json.dumps({"key": "k", "records": [[1, 2]]}))
    calls = []

    def build(beat):
        calls.append(1)
        return {"records": [[1, 2], [3, 4], [5, 6]]}

    data, how = LC.load_or_build(path, "k", 3, build, poll_s=0.01)
    assert how == "built" and calls == [1] and len(data["records"]) == 3


def test_length_cache_key_depends_on_the_symlink_policy(tmp_path):
    """length_index.py:159: the symlink policy decides which records are usable, so it keys the cache."""
    from cmpt.data import sources
    from cmpt.data.llava_source import LlavaSource
    from cmpt.data.pipeline import LengthIndex
    from cmpt.demo.synthetic import generate

    js = generate("scenes", 3, tmp_path / "d", seed=0)
    src, proc, tok = LlavaSource(js), tiny_processor(), tiny_tokenizer()
    cache = tmp_path / "cache"
    before = sources.FOLLOW_SYMLINKS
    try:
        sources.set_follow_symlinks(False)
        assert LengthIndex.build(src, proc, tok, cache_dir=cache, backend="serial").how == "built"
        assert LengthIndex.build(src, proc, tok, cache_dir=cache, backend="serial").how == "cached"
        sources.set_follow_symlinks(True)
        assert LengthIndex.build(src, proc, tok, cache_dir=cache, backend="serial").how == "built"
    finally:
        sources.set_follow_symlinks(before)
    assert len(list(cache.glob("lengths-*.json"))) == 2


# ============================================================================ vlm/vision_tokens.py
def test_an_image_with_no_token_is_refused():
    """vision_tokens.py:119: every image needs at least one merged token."""
    from cmpt.vlm.vision_tokens import ConversationError, check_placeholders

    with pytest.raises(ConversationError, match=">= 1 token"):
        check_placeholders(1, [0], "s")
    check_placeholders(1, [1], "s")


# ============================================================================ embed/vision_attention.py
def test_vision_attention_plan_cache_is_keyed_by_backend():
    """vision_attention.py:42: a cached plan is reused only for the same backend / dtype / device."""
    from cmpt.embed.vision_attention import _plan

    cu = torch.tensor([0, 4, 8], dtype=torch.int32)
    q = torch.zeros(1, 2, 8, 4)
    p1 = _plan(cu, 8, "sdpa", q)
    p2 = _plan(cu, 8, "flex", q)
    assert (p1.backend, p2.backend) == ("sdpa", "flex")
    assert _plan(cu, 8, "sdpa", q) is p1  # and the cache does work for the same key


def test_vision_varlen_refuses_different_key_segments():
    """vision_attention.py:73: query and key must share their segments."""
    from cmpt.embed.vision_attention import vision_varlen_forward

    q = torch.randn(1, 2, 8, 4)
    with pytest.raises(ValueError, match="segments differ"):
        vision_varlen_forward(
            torch.nn.Module(), q, q, q,
            cu_seq_lens_q=torch.tensor([0, 4, 8], dtype=torch.int32),
            cu_seq_lens_k=torch.tensor([0, 2, 8], dtype=torch.int32),
        )  # fmt: skip


# ============================================================================ recipes/moca_cl_objective.py
def test_grad_cache_chunk_images_slice_patch_rows_by_image():
    """moca_cl_objective.py:84: a chunk's patch rows are those of its inputs' *images*, whatever
    inputs without an image or with several come first."""
    from cmpt.recipes.moca_cl_objective import ContrastiveObjective

    grids = [(2, 2), (4, 4), (2, 4), (2, 2)]  # rows 4, 16, 8, 4 (32 in all)
    batch = {
        "images_per_sample": torch.tensor(
            [0, 1, 2, 1]
        ),  # input 0: none; 1: image 0; 2: images 1, 2; 3: image 3
        "grid_hw": torch.tensor(grids),
        "patches": torch.arange(32).view(32, 1).float(),
    }
    got = ContrastiveObjective._images(batch, 1, 3)  # inputs 1, 2 → images 0..2 → rows 0..28
    assert got["patches"].flatten().tolist() == list(range(0, 28))
    assert got["grid_hw"].tolist() == [[2, 2], [4, 4], [2, 4]]
    got = ContrastiveObjective._images(batch, 2, 4)  # inputs 2, 3 → images 1..3 → rows 4..32
    assert got["patches"].flatten().tolist() == list(range(4, 32))
    assert ContrastiveObjective._images(batch, 0, 1) == {"images_per_sample": batch["images_per_sample"][0:1]}


# ============================================================================ recipes/comp_objective.py
def _fake_vlm(rows: int = 10):
    return SimpleNamespace(lm_head=torch.nn.Linear(4, rows))


def test_align_weight_zero_switches_the_alignment_term_off():
    """comp_objective.py:39: ``align_weight = 0`` computes no alignment term (nor its count)."""
    from cmpt.recipes.comp import LossConfig
    from cmpt.recipes.comp_objective import CompObjective

    assert CompObjective(_fake_vlm(), LossConfig(align=True, align_weight=0.0)).align is False
    assert CompObjective(_fake_vlm(), LossConfig(align=True, align_weight=0.05)).align is True


def test_vocab_counts_are_zero_padded_to_the_lm_head():
    """comp_objective.py:46: tokens appended after counting have count 0, which changes Σ n."""
    from cmpt.recipes.comp import LossConfig
    from cmpt.recipes.comp_objective import CompObjective

    counts = torch.tensor([3, 0, 1], dtype=torch.long)
    obj = CompObjective(_fake_vlm(5), LossConfig(prior_temp=0.5), vocab_counts=counts)
    assert obj.vocab_counts.tolist() == [3, 0, 1, 0, 0]
    # p = clamp(n, 1) / Σ n = [3, 1, 1, 1, 1] / 4; log π = log_softmax(p / 0.5)
    z = [x / 4 / 0.5 for x in (3, 1, 1, 1, 1)]
    lse = math.log(sum(math.exp(v) for v in z))
    expected = [v - lse for v in z]
    assert obj._log_prior.tolist() == pytest.approx(expected, rel=1e-12)


# ============================================================================ train/optim.py
def test_probe_parameters_get_no_weight_decay():
    """optim.py:29: ``probe`` (a 2-D attention-pool query) is in the no-decay group."""
    from cmpt.train.config import OptimConfig
    from cmpt.train.optim import split_decay

    params = {
        "head.probe": torch.zeros(1, 4),
        "head.fc.weight": torch.zeros(4, 4),
        "head.fc.bias": torch.zeros(4),
    }
    groups = split_decay([{"name": "g", "param_names": list(params)}], params, OptimConfig(weight_decay=0.1))
    by = {g["name"]: g for g in groups}
    assert by["g"]["weight_decay"] == 0.1 and len(by["g"]["params"]) == 1
    assert by["g"]["params"][0] is params["head.fc.weight"]
    assert by["g.no_decay"]["weight_decay"] == 0.0
    assert {id(p) for p in by["g.no_decay"]["params"]} == {
        id(params["head.probe"]),
        id(params["head.fc.bias"]),
    }


def test_warmup_ratio_rounds():
    """optim.py:115: the warmup is ``round(warmup_ratio · total_steps)`` (config docstring)."""
    from cmpt.train.config import OptimConfig
    from cmpt.train.optim import lr_factor, warmup_length

    cfg = OptimConfig(warmup_steps=0, warmup_ratio=0.25, schedule="constant")
    assert warmup_length(cfg, 7) == 2  # 1.75 → 2
    assert lr_factor(1, cfg, 7) == 0.5 and lr_factor(2, cfg, 7) == 1.0


# ============================================================================ train/reshard.py
def test_world_size_change_hint_only_when_the_batch_divides(tmp_path):
    """reshard.py:113: the ``--set key=N keeps it`` hint needs saved global batch % new world == 0."""
    from cmpt.train.reshard import world_size_change

    ckpt = tmp_path / "step_1"
    ckpt.mkdir()
    (ckpt / "trainer_state.json").write_text(json.dumps({"world_size": 2}))
    old = {"train": {"grad_accum": 3}}  # global batch 6
    changes, ok, _ = world_size_change(ckpt, old, {"train": {"grad_accum": 1}}, 4)  # 6 % 4 != 0
    assert ok == () and "keeps it" not in changes["train.world_size"][1]
    changes, _, _ = world_size_change(ckpt, old, {"train": {"grad_accum": 1}}, 3)  # 6 % 3 == 0
    assert changes["train.world_size"][1].endswith("(--set train.grad_accum=2 keeps it)")


# ============================================================================ train/fingerprint.py
def test_fingerprint_reads_three_directory_levels_down(tmp_path):
    """fingerprint.py:63: a directory's data files are read "down to 3 levels" below it (module
    docstring): ``<root>/a/b/c/x`` counts, ``<root>/a/b/c/d/x`` does not. NOTE: the inline comment
    at fingerprint.py:64 says "<root>/a/b/ is the deepest level read", which disagrees with the code
    (and with this test); this pins what the code and the docstring do."""
    from cmpt.train.fingerprint import data_fingerprint

    root = tmp_path / "hub"
    for rel in ("cfg/train/p.parquet", "a/b/c/x.json", "a/b/c/d/y.json"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(b"v1")
    cfg = {"data": {"path": str(root)}}
    fp = data_fingerprint(cfg)
    assert fp["data.path[content]"].endswith("of 2 files")
    (root / "a/b/c/d/y.json").write_bytes(b"v2")
    assert data_fingerprint(cfg) == fp  # four levels down: not read
    (root / "a/b/c/x.json").write_bytes(b"v2")
    assert data_fingerprint(cfg) != fp


def test_fingerprint_of_a_large_file_sees_its_end(tmp_path):
    """fingerprint.py:44: beyond 32 MiB, 8 blocks spread over the whole file (the last one at its end)."""
    from cmpt.train.fingerprint import data_fingerprint

    big = tmp_path / "big.jsonl"
    size = 40 << 20
    with open(big, "wb") as fh:
        fh.truncate(size)  # sparse
    cfg = {"data": {"path": str(big)}}
    fp = data_fingerprint(cfg)
    with open(big, "r+b") as fh:
        fh.seek(size - 10)
        fh.write(b"x")
    assert data_fingerprint(cfg) != fp


def test_nested_mixture_members_with_one_name_are_told_apart(tmp_path):
    """fingerprint.py:99: members of nested mixtures are keyed by their path through the nesting,
    so two sub-mixtures' ``a.jsonl`` do not overwrite each other."""
    from cmpt.train.fingerprint import data_fingerprint

    for sub in ("x", "y"):
        (tmp_path / sub).mkdir()
        (tmp_path / sub / "a.jsonl").write_text(f'{{"id": "{sub}"}}\n')
        (tmp_path / sub / "m.yaml").write_text("datasets:\n  - path: a.jsonl\n")
    (tmp_path / "mix.yaml").write_text("datasets:\n  - path: x/m.yaml\n  - path: y/m.yaml\n")
    cfg = {"data": {"path": str(tmp_path / "mix.yaml")}}
    fp = data_fingerprint(cfg)
    assert len(fp) == 5  # the mixture, 2 sub-mixtures, 2 members
    (tmp_path / "x" / "a.jsonl").write_text('{"id": "changed"}\n')
    assert data_fingerprint(cfg) != fp


# ============================================================================ hub.py
def test_tilde_names_are_local_paths_never_hub_ids():
    """hub.py:104: ``~name`` can only be a local path: refused when missing, never looked up, also
    for an unknown ``~user`` (pathlib raises RuntimeError there; cmpt.paths.user_path does not)."""
    from cmpt.hub import check_local_path

    with pytest.raises(FileNotFoundError, match="does not exist"):
        check_local_path("~cmpt_no_such_user_zz", "model")


# ============================================================================ data/streaming.py
@pytest.fixture(scope="module")
def stream_parts(tmp_path_factory):
    """12 synthetic scenes in 4 tar shards, a builder, and every sample's (id, (vision, text))
    lengths in stream order (one unshuffled stream reads the shards in order)."""
    from cmpt.data.convert import llava_to_wds
    from cmpt.data.pipeline import SampleBuilder, estimate_lengths, length_overhead
    from cmpt.data.webdataset import ShardList
    from cmpt.demo.synthetic import generate

    root = tmp_path_factory.mktemp("stream")
    js = generate("scenes", 12, root, seed=0)
    shards = ShardList(llava_to_wds(js, root / "wds", samples_per_shard=3)["pattern"])
    builder = SampleBuilder(
        tiny_processor(), tiny_tokenizer(), max_text_tokens=512, caption_max_tokens=32, seed=1
    )
    over = length_overhead(builder)
    order = [
        (r.id, estimate_lengths(r, builder.processor, builder.tokenizer, over)) for r in shards.iter_records()
    ]
    return shards, builder, order


def _batches(shards, builder, cfg, n):
    import itertools

    from cmpt.data.streaming import StreamingLoader

    loader = StreamingLoader(shards, builder, cfg)
    return loader, list(itertools.islice(loader, n))


def test_stream_sample_exactly_at_the_vision_budget_is_batched(stream_parts):
    """streaming.py:216: only a sample *over* a budget on its own is skipped; one at it is batched."""
    from cmpt.data.streaming import StreamConfig

    shards, builder, order = stream_parts
    top = max(v for _, (v, _) in order)
    assert sum(v == top for _, (v, _) in order) >= 1
    cfg = StreamConfig(top, 10**6, 1, shuffle=False)
    loader, got = _batches(shards, builder, cfg, len(order))
    assert [b["sample_ids"] for b in got] == [[sid] for sid, _ in order]
    assert loader.oversize_skipped == 0


def test_stream_batch_fills_up_to_the_budget_exactly(stream_parts):
    """streaming.py:225: a sample that brings the micro-batch exactly to the budget still joins it."""
    from cmpt.data.streaming import StreamConfig

    shards, builder, order = stream_parts
    (id0, (v0, _)), (id1, (v1, _)), (_, (v2, _)) = order[:3]
    assert v2 > 0
    cfg = StreamConfig(v0 + v1, 10**6, 10, shuffle=False)
    _, got = _batches(shards, builder, cfg, 1)
    assert got[0]["sample_ids"] == [id0, id1]


def test_stream_text_estimates_are_capped(stream_parts):
    """streaming.py:127: with ``text_cap`` (oversize="truncate") text estimates are capped, so long
    samples still pack together: cap c, text budget 2c → two samples per micro-batch."""
    from cmpt.data.streaming import StreamConfig

    shards, builder, order = stream_parts
    assert all(t > 1 for _, (_, t) in order)
    cfg = StreamConfig(10**6, 2, 10, oversize="truncate", text_cap=1, shuffle=False)
    _, got = _batches(shards, builder, cfg, 2)
    assert [b["sample_ids"] for b in got] == [[order[0][0], order[1][0]], [order[2][0], order[3][0]]]


def test_stream_resume_after_a_bad_stretch_ending_in_a_corrupt_tail(tmp_path, stream_parts):
    """streaming.py:168: when the 64th bad sample in a row is a shard's corrupt tail, the state saved
    with the empty micro-batch points past that shard: a resumed loader does not read the tail again
    (a continued one and a resumed one give the same micro-batches and bad counts)."""
    from cmpt.data.batching import MAX_CARRIED_BAD
    from cmpt.data.convert import write_tar_samples
    from cmpt.data.streaming import StreamConfig, StreamingLoader
    from cmpt.data.webdataset import ShardList

    _, builder, _ = stream_parts

    def png(seed):
        buf = io.BytesIO()
        noise(40, 30, seed=seed).save(buf, "PNG")
        return buf.getvalue()

    def rec(i):
        return json.dumps({"id": f"s{i}", "conversations": conv()}).encode()

    bad = [(f"{i:03d}", {"png": b"x"}) for i in range(MAX_CARRIED_BAD - 1)]  # no .json: missing_key
    write_tar_samples(str(tmp_path / "full.tar"), [*bad, ("999", {"json": rec(999), "png": png(1)})])
    data = (tmp_path / "full.tar").read_bytes()
    with tarfile.open(fileobj=io.BytesIO(data)) as tf:
        cut = tf.getmember("999.png").offset + 512 + 20
    (tmp_path / "a-0.tar").write_bytes(data[:cut])  # the last sample is cut: a corrupt tail
    write_tar_samples(str(tmp_path / "a-1.tar"), [("100", {"json": rec(100), "png": png(2)})])
    shards = ShardList(str(tmp_path / "a-{0..1}.tar"))
    cfg = StreamConfig(100, 4000, 1, shuffle=False)

    loader = StreamingLoader(shards, builder, cfg)
    it = iter(loader)
    first = next(it)
    assert first["num_samples"] == 0 and first["num_bad"] == MAX_CARRIED_BAD
    state = loader.state_dict()
    continued = [next(it) for _ in range(2)]
    resumed_loader = StreamingLoader(shards, builder, cfg)
    resumed_loader.load_state_dict(state)
    rit = iter(resumed_loader)
    resumed = [next(rit) for _ in range(2)]
    assert [(b["sample_ids"], b["num_bad"]) for b in continued] == [(["s100"], 0), ([], MAX_CARRIED_BAD)]
    assert [(b["sample_ids"], b["num_bad"]) for b in resumed] == [(["s100"], 0), ([], MAX_CARRIED_BAD)]


# ============================================================================ embed/embedder.py
@pytest.fixture(scope="module")
def vlm(tmp_path_factory):
    from vlm_fixtures import build_dirs, build_vlm

    return build_vlm(build_dirs(tmp_path_factory.mktemp("emb2")), "qwen2")


def test_embedder_cut_keeps_the_last_image_end_token(vlm):
    """embedder.py ``_render``: a long input is cut after its last image's ``<|vision_end|>`` (inclusive)."""
    from PIL import Image

    from cmpt.embed.embedder import Embedder

    emb = Embedder(vlm, max_length=32)
    img = Image.new("RGB", (56, 28), (200, 10, 10))
    text = emb._text("word " * 60 + "<image>", 1, None, 0)
    ids, _ = emb._render(text, emb._images([img]), 0)
    end = vlm.config.vision_end_id
    assert len(ids) > 32 and int(ids[-1]) == end
    assert int((ids == end).sum()) == 1
    ids_short, _ = emb._render(emb._text("word " * 60, 0, None, 1), None, 1)
    assert len(ids_short) == 32  # text only: cut at max_length
