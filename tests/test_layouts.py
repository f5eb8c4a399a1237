"""Data layouts users already have (docs/data.md): each round-trips through `cmpt data check` — clean
data → 0 bad, one deliberately broken record → counted with the right reason — and builds the same
samples as its LLaVA original. The 2-step training runs are in test_layouts_train.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from broken_corpus import tiny_processor, tiny_tokenizer
from cmpt.cli import main as cli_main
from cmpt.data.chat_layout import DEFAULT_CAPTION_PROMPT, caption_conversation, messages_to_conversations
from cmpt.data.hf_source import HFSource
from cmpt.data.hub_layout import parquet_files
from cmpt.data.llava_source import LlavaSource
from cmpt.data.mixture import MixtureSource, load_mixture
from cmpt.data.open import open_source, source_kind
from cmpt.data.pipeline import SampleBuilder
from cmpt.data.sources import REASONS, BadSample
from cmpt.data.tar_index import TarIndexSource
from cmpt.data.webdataset import RawSample, ShardList, decode_sample, iter_tar
from cmpt.demo.synthetic import generate
from cmpt.vlm.chat import render_conversation
from cmpt.vlm.vision_tokens import ConversationError
from layout_fixtures import CAPTION_KINDS, KINDS, N, hf_rows, llava_records, to_messages, write_layout

datasets = pytest.importorskip("datasets")


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("CMPT_CACHE", str(tmp_path / "cache"))  # tar indexes, length indexes


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("layouts")
    generate("scenes", N, root, seed=0, split="train")
    return root


def _check(path: str, tmp_path: Path) -> tuple[int, list[dict]]:
    out = tmp_path / "bad.jsonl"
    rc = cli_main(["data", "check", path, "--out", str(out)])
    return rc, [json.loads(x) for x in out.read_text().splitlines()]


# -- data check: clean → 0 bad, broken → its reason --------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_data_check_round_trip(kind, root, tmp_path):
    clean, _ = write_layout(kind, root, broken=False)
    rc, bad = _check(clean, tmp_path)
    assert rc == 0 and bad == [], bad
    broken, reason = write_layout(kind, root, broken=True)
    rc, bad = _check(broken, tmp_path)
    copies = 2 if kind == "mixture" else 1  # the tar member has weight 2
    assert rc == 1 and len(bad) == copies and all(b["reasons"] == [reason] for b in bad), bad
    assert reason in REASONS


def _built(source, n: int) -> list:
    builder = SampleBuilder(tiny_processor(), tiny_tokenizer(), max_text_tokens=4096, shuffle_caption=False)
    return [builder.build(source[i]) for i in range(n)]


@pytest.mark.parametrize(
    "kind", ["chat_json", "chat_jsonl", "chat_hf_disk", "chat_hf_parquet", "chat_tar", "llava_tar"]
)
def test_chat_and_tar_layouts_build_the_llava_samples(kind, root):
    """The same ids, token ids and patches as the LLaVA JSON the records came from."""
    ref = _built(LlavaSource(root / "train.json"), N)
    path, _ = write_layout(kind, root, broken=False)
    src = open_source(path)
    src = TarIndexSource(src, cache_dir=None) if isinstance(src, ShardList) else src
    for a, b in zip(ref, _built(src, N), strict=True):
        assert (a.id, a.grids) == (b.id, b.grids) and torch.equal(a.input_ids, b.input_ids)
        assert torch.equal(a.labels, b.labels) and torch.equal(a.patches, b.patches)


def test_chat_layout_details(root):
    path, _ = write_layout("chat_jsonl", root, broken=False)
    src = LlavaSource(path)
    inline, plain = src[N], src[N + 1]
    assert inline.images == [json.loads((root / "train.json").read_text())[0]["image"]]
    assert inline.conversations[0]["content"].startswith("<image>\n") and plain.images == []
    assert "messages" not in inline.meta
    # parts concatenate without separator; null fields (Arrow structs) are absent fields
    parts = [
        {"type": "text", "text": "A", "image": None},
        {"type": "image", "text": None},
        {"type": "text", "text": "B"},
    ]
    msgs = [{"role": "user", "content": parts}, {"role": "assistant", "content": "C"}]
    assert messages_to_conversations(msgs, ["x.png"], "r")[0][0]["content"] == "A<image>B"
    assert messages_to_conversations(json.dumps(msgs), ["x.png"], "r")[1] == ["x.png"]
    for bad, needle in [
        ({"messages": "not json"}, "not valid JSON"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": "u"}]}]}, "image_url"),
        (
            {"messages": [{"role": "user", "content": [{"type": "image", "url": "http://x/a.png"}]}]},
            "not downloaded",
        ),
        (
            {
                "messages": [{"role": "user", "content": [{"type": "image", "image": "a.png"}]}],
                "images": ["b.png"],
            },
            "use one",
        ),
        ({"messages": [{"role": "user", "content": ["text"]}]}, "not an object"),
    ]:
        with pytest.raises(BadSample, match=needle) as e:
            messages_to_conversations(bad["messages"], bad.get("images", []), "r")
        assert e.value.reason == "bad_value"
    # a record with both keeps its LLaVA conversations
    both = {"id": "b", "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}],
            "messages": [{"role": "user", "content": [{"type": "video"}]}]}  # fmt: skip
    (root / "both.jsonl").write_text(json.dumps(both) + "\n")
    assert LlavaSource(root / "both.jsonl")[0].conversations == both["conversations"]


# -- LLaVA records verbatim in tar shards -------------------------------------------------------
def _decode(obj: dict, members: dict[str, bytes]):
    return decode_sample(RawSample("000007", {"json": json.dumps(obj).encode(), **members}), "s.tar")


def test_tar_image_paths_resolve_to_members():
    conv = [{"from": "human", "value": "<image><image>"}, {"from": "gpt", "value": "a"}]
    two = {"0.png": b"A", "1.png": b"B"}
    assert _decode({"image": ["coco/x.jpg", "coco/y.jpg"], "conversations": conv}, two).images == [b"A", b"B"]
    # a path whose base name is a member is that member, the others take the rest in order
    named = {"x.jpg": b"X", "png": b"P"}
    assert _decode({"image": ["a/png.jpg", "d/x.jpg"], "conversations": conv}, named).images == [b"P", b"X"]
    assert _decode({"images": ["000007.png", "d/x.jpg"], "conversations": conv}, named).images == [b"P", b"X"]
    one = _decode({"image": "coco/train2017/000000033471.jpg", "conversations": conv[:1]}, {"jpg": b"J"})
    assert one.images == [b"J"]
    with pytest.raises(BadSample, match="no member") as e:
        _decode({"image": ["a.jpg", "b.jpg"], "conversations": conv}, {"jpg": b"J"})
    assert e.value.reason == "missing_image"
    with pytest.raises(BadSample) as e:  # a member extension that is not there stays missing
        _decode({"image": "png", "conversations": conv}, {})
    assert e.value.reason == "missing_image"


# -- captions (tar .txt, tar metadata, JSON / HF caption keys): CoMP conversations, MoCa documents ---
def _caption_records(kind: str, root: Path) -> list:
    path, _ = write_layout(kind, root, broken=False)
    src = open_source(path)
    return list(src.iter_records()) if isinstance(src, ShardList) else [src[i] for i in range(len(src))]


def _same_sample(a, b) -> bool:
    return (
        a.id == b.id
        and a.grids == b.grids
        and all(
            torch.equal(getattr(a, k), getattr(b, k))
            for k in ("input_ids", "labels", "patches", "caption_ids")
        )
    )


@pytest.mark.parametrize("kind", CAPTION_KINDS)
def test_caption_records_are_conversations_for_comp_and_documents_for_moca(kind, root):
    from cmpt.data.documents import DocumentBuilder
    from cmpt.data.validate import document_text

    recs = _caption_records(kind, root)
    captions = [r["conversations"][1]["value"] for r in llava_records(root)]
    assert [r.caption for r in recs] == captions and all(r.is_caption and not r.is_document for r in recs)
    rec, caption = recs[0], captions[0]
    assert rec.meta["url"].startswith("http") and "caption" not in rec.meta
    assert rec.conversations == caption_conversation(caption)
    assert document_text(rec) == "<image>\n" + caption  # MoCa reads the document, as before
    tok, proc = tiny_tokenizer(), tiny_processor()
    moca = DocumentBuilder(proc, tok, max_text_tokens=512, masking=False)
    assert tok.decode(moca.build(rec).input_ids).endswith(caption)
    ref = _caption_records("caption_tar", root)  # exactly as .txt captions are read
    assert all(_same_sample(moca.build(a), moca.build(b)) for a, b in zip(ref, recs, strict=True))
    for prompt in (DEFAULT_CAPTION_PROMPT, "Caption:"):
        comp = SampleBuilder(proc, tok, caption_prompt=prompt, shuffle_caption=False)
        s = comp.build(rec)
        text = tok.decode(s.input_ids)
        assert prompt in text and text.index(prompt) < text.index(caption)
        assert tok.decode(s.labels[s.labels >= 0]).startswith(caption)  # the caption is supervised
        assert tok.decode(s.caption_ids) == caption  # and is the text of the alignment loss
        assert all(_same_sample(comp.build(a), comp.build(b)) for a, b in zip(ref, recs, strict=True))
    from cmpt.data.config import DataConfig

    with pytest.raises(ValueError, match="caption_prompt"):
        DataConfig(caption_prompt="<image> Describe")


def test_caption_keys_give_way_to_other_content(root):
    conv = [{"from": "human", "value": "<image>\nQ?"}, {"from": "gpt", "value": "A."}]
    rows = [
        {"id": "cap", "image": "a.jpg", "caption": " A cat. "},  # stripped caption, text as written
        {"id": "conv", "image": "a.jpg", "caption": "x", "conversations": conv},  # conversations win
        {"id": "chat", "images": ["a.jpg"], "caption": "x", "messages": to_messages(conv)},
        {"id": "doc", "text": "Some text.", "caption": "x"},  # a document's text wins
        {"id": "pair", "qry": "q", "pos_text": "p", "caption": "x"},  # a pair stays a pair
        {"id": "passage", "caption": "Only text."},  # no image: a text-only passage
        {"id": "two", "images": ["a.jpg", "b.jpg"], "caption": "<image> and <image>"},  # a document
        {"id": "bad", "image": "a.jpg", "caption": 3},
    ]
    (root / "keys.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    src = LlavaSource(root / "keys.jsonl")
    cap, conv_rec, chat, doc, pair, passage, two = (src[i] for i in range(7))
    assert cap.is_caption and cap.caption == "A cat." and cap.text == "<image>\n A cat. "
    assert not conv_rec.is_caption and conv_rec.conversations == conv and "caption" not in conv_rec.meta
    assert not chat.is_caption and chat.conversations[0]["content"] == "<image>\nQ?"
    assert doc.is_document and doc.text == "Some text." and pair.is_pair and not pair.is_caption
    assert passage.is_document and passage.text == "Only text." and passage.images == []
    assert two.is_document and two.text == "<image> and <image>" and two.caption is None
    with pytest.raises(BadSample, match="'caption' must be a string") as e:
        src[7]
    assert e.value.reason == "bad_value"
    # tar: the .txt member wins over the metadata's caption; metadata alone is read
    assert _decode({"caption": "meta"}, {"jpg": b"J", "txt": b"from txt"}).caption == "from txt"
    assert _decode({"caption": "meta", "url": "u"}, {"jpg": b"J"}).caption == "meta"
    assert _decode({"url": "u"}, {"jpg": b"J"}).conversations is None  # nothing to read: missing_key


def test_caption_records_survive_conversion_to_tar(root, tmp_path):
    from cmpt.data.convert import llava_to_wds

    path, _ = write_layout("caption_jsonl", root, broken=False)
    out = llava_to_wds(path, tmp_path / "wds")
    recs = list(ShardList(out["pattern"]).iter_records())
    assert [r.caption for r in recs] == [r.caption for r in _caption_records("caption_jsonl", root)]
    assert all(r.is_caption for r in recs) and _check(out["pattern"], tmp_path)[0] == 0


# -- mixtures of tar shards with map-style sources ------------------------------------------------
def test_tar_shards_mix_with_json_and_hf(root, tmp_path):
    path, _ = write_layout("mixture", root, broken=False)
    mix = load_mixture(path)
    assert isinstance(mix, MixtureSource) and mix.member_counts() == [N + 2, 2 * N, 3]
    ids = [mix[i].id for i in range(len(mix))]
    assert len(set(ids)) == len(ids) and "tar/scenes-train-000000#1" in ids
    assert [m.split for m in mix.members] == ["", "", "test"]
    index = list((tmp_path / "cache" / "tar_index").glob("tar-index-*.json"))
    assert len(index) == 1  # offsets cached; reopening reads the cache
    before = index[0].stat().st_mtime_ns
    assert len(load_mixture(path)) == len(mix) and index[0].stat().st_mtime_ns >= before


def test_tar_index_reports_corrupt_shards(root, tmp_path):
    path, _ = write_layout("chat_tar", root, broken=False)
    shard = Path(path) / "shard-000000.tar"
    cut = tmp_path / "cut.tar"
    offsets = [raw.offset for raw in iter_tar(str(shard))]
    for at in (offsets[3] + 1500, offsets[3] + 4000):  # inside the json member, inside the png member
        cut.write_bytes(shard.read_bytes()[:at])
        _same_as_stream(cut, tmp_path)


def _same_as_stream(cut: Path, tmp_path: Path) -> None:
    src = TarIndexSource(str(cut), cache_dir=tmp_path)
    reasons = []
    for i in range(len(src)):
        try:
            src[i]
        except BadSample as e:
            reasons.append(e.reason)
    streamed = list(ShardList(str(cut)).iter_records())
    assert reasons == ["corrupt_archive"] and len(src) == len(streamed) == 4, len(src)
    assert isinstance(streamed[-1], BadSample) and [r.id for r in streamed[:3]] == [
        src[i].id for i in range(3)
    ]
    # reading every record by streaming each shard once gives what indexing gives
    records = list(src.iter_records())
    assert [r.id for r in records[:3]] == [r.id for r in streamed[:3]] and len(records) == 4
    assert isinstance(records[3], BadSample) and records[3].reason == "corrupt_archive"


# -- hub layouts and splits ----------------------------------------------------------------------
def test_hub_layouts_and_splits(root, tmp_path):
    hub, _ = write_layout("split", root, broken=False)
    base = hub.split("#")[0]
    assert source_kind(base) == "hf" and source_kind(hub) == "hf"
    assert len(HFSource(base, split="test")) == N and len(open_source(hub)) == N
    assert len(open_source(base + "#validation")) == 2
    with pytest.raises(ValueError, match=r"several splits \['test', 'validation'\]"):
        HFSource(base)  # no train split: the user must choose
    with pytest.raises(ValueError, match="no split 'dev'"):
        open_source(base + "#dev")
    with pytest.raises(ValueError, match="selects files of a directory"):
        HFSource(parquet_files(base, "test")[0], split="test")
    with pytest.raises(ValueError, match="only to Hugging Face"):
        open_source(str(root / "train.json") + "#test")
    recs = llava_records(root)
    datasets.DatasetDict(
        {"train": hf_rows(root, recs[:2], None), "test": hf_rows(root, recs[:3], None)}
    ).save_to_disk(tmp_path / "dd")
    assert len(open_source(f"{tmp_path / 'dd'}#test")) == 3 and len(open_source(tmp_path / "dd")) == 2
    cfg, _ = write_layout("hub_root", root, broken=False)
    assert source_kind(cfg) == "hf" and len(HFSource(cfg)) == N  # train by default
    assert len(HFSource(cfg, split="validation")) == 2
    # flat directories: unnamed files all count; <split>/ folders; several configurations
    flat = tmp_path / "flat"
    (flat / "train").mkdir(parents=True)
    (flat / "test").mkdir()
    for name in ("train/0000.parquet", "test/0000.parquet"):
        (flat / name).write_bytes(b"")
    assert [Path(f).parent.name for f in parquet_files(str(flat))] == ["train"]
    assert [Path(f).parent.name for f in parquet_files(str(flat), "test")] == ["test"]
    (tmp_path / "two" / "en").mkdir(parents=True)
    (tmp_path / "two" / "fr").mkdir()
    for name in ("en/train.parquet", "fr/train.parquet"):
        (tmp_path / "two" / name).write_bytes(b"")
    with pytest.raises(ValueError, match="several dataset configurations"):
        parquet_files(str(tmp_path / "two"))
    assert len(parquet_files(str(tmp_path / "two" / "fr"))) == 1


# -- render errors carry their reason -----------------------------------------------------------
@pytest.mark.parametrize(
    "convs, images, max_length, reason",
    [
        ([], [], None, "empty_conversation"),
        ([{"from": "human", "value": "q"}], [], None, "no_assistant_turn"),
        (
            [{"from": "human", "value": "q"}, {"from": "gpt", "value": "<image>"}],
            [4],
            None,
            "placeholder_mismatch",
        ),
        (
            [{"from": "human", "value": "<image>q"}, {"from": "gpt", "value": "a"}],
            [],
            None,
            "placeholder_mismatch",
        ),
        ([{"from": "robot", "value": "q"}, {"from": "gpt", "value": "a"}], [], None, "bad_value"),
        ([{"from": "human", "value": "<|image_pad|>"}, {"from": "gpt", "value": "a"}], [], None, "bad_value"),
        ([{"from": "human", "value": "q <image>"}, {"from": "gpt", "value": "a"}], [64], 8, "too_long"),
    ],
)
def test_render_errors_carry_their_reason(convs, images, max_length, reason):
    with pytest.raises(ConversationError) as e:
        render_conversation(convs, tiny_tokenizer(), images, max_length=max_length, sample_id="s")
    assert e.value.reason == reason and reason in REASONS
    import pickle

    assert pickle.loads(pickle.dumps(e.value)).reason == reason


@pytest.mark.parametrize("kind", ["caption_tar", "caption_jsonl"])  # streamed, map-style
def test_data_caption_prompt_reaches_the_loader(kind, root):
    from cmpt.data.config import DataConfig
    from cmpt.data.loader import build_loader

    path, _ = write_layout(kind, root, broken=False)
    tok = tiny_tokenizer()
    cfg = DataConfig(path=path, vision_budget=4096, text_budget=8192, caption_prompt="Caption this image:")
    batch = next(iter(build_loader(cfg, tiny_processor(), tok)))
    assert batch["num_samples"] >= 1 and "Caption this image:" in tok.decode(batch["input_ids"])
