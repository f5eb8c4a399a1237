"""The data layouts of docs/data.md, written from the LLaVA records of a synthetic set: the writers
and record builders shared by tests/test_layouts.py and tests/test_layouts_train.py."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import yaml
from PIL import Image

from cmpt.data.convert import write_tar_samples

datasets = pytest.importorskip("datasets")

N = 6  # clean records per layout
ROLE = {"human": "user", "gpt": "assistant"}


# -- writers: the LLaVA records of a synthetic set, in each layout -------------------------------
def to_messages(convs: list[dict]) -> list[dict]:
    """LLaVA turns → chat-layout messages with typed parts (an image part where each <image> was)."""
    out = []
    for t in convs:
        parts: list[dict] = []
        for i, piece in enumerate(t["value"].split("<image>")):
            if i:
                parts.append({"type": "image"})
            if piece:
                parts.append({"type": "text", "text": piece})
        out.append({"role": ROLE[t["from"]], "content": parts})
    return out


def _png(root: Path, rec: dict) -> bytes:
    return (root / rec["image"]).read_bytes()


def _jpeg(png: bytes) -> bytes:
    buf = io.BytesIO()
    Image.open(io.BytesIO(png)).convert("RGB").save(buf, format="JPEG", quality=90)
    return buf.getvalue()


_FEATURES = {
    "id": {"dtype": "string", "_type": "Value"},
    "messages": [{"role": {"dtype": "string", "_type": "Value"},
                  "content": [{"type": {"dtype": "string", "_type": "Value"},
                               "text": {"dtype": "string", "_type": "Value"}}]}],
    "images": [{"_type": "Image"}],
}  # fmt: skip


def hf_rows(root: Path, records: list[dict], bad: dict | None) -> datasets.Dataset:
    rows = [
        {
            "id": r["id"],
            "messages": to_messages(r["conversations"]),
            "images": [{"bytes": _png(root, r), "path": None}],
        }
        for r in records
    ]
    if bad is not None:
        rows.append(bad)
    return datasets.Dataset.from_list(rows, features=datasets.Features.from_dict(_FEATURES))


def _bad_hf(root: Path, rec: dict, kind: str) -> dict:
    img = [{"bytes": _png(root, rec), "path": None}]
    if kind == "audio":  # an unsupported part type
        content = [{"type": "audio", "text": None}, {"type": "text", "text": "Hear it?"}]
    else:  # two image parts, one image
        content = [
            {"type": "image", "text": None},
            {"type": "image", "text": None},
            {"type": "text", "text": "Two?"},
        ]
    msgs = [
        {"role": "user", "content": content},
        {"role": "assistant", "content": [{"type": "text", "text": "no"}]},
    ]
    return {"id": "bad", "messages": msgs, "images": img}


def llava_records(root: Path) -> list[dict]:
    return json.loads((root / "train.json").read_text())[:N]


def _caption_meta(i: int, rec: dict) -> dict:
    """img2dataset's metadata of sample ``i``, with the caption of LLaVA record ``rec``."""
    return {"key": f"{i:09d}", "url": f"http://example.com/{i}.jpg", "status": "success",
            "caption": rec["conversations"][1]["value"], "width": 64, "height": 64}  # fmt: skip


def write_layout(kind: str, root: Path, broken: bool) -> tuple[str, str | None]:
    """``(path, reason)``: ``kind``'s data under ``root`` (N clean records, plus one bad one when
    ``broken``) and the reason the bad one must be reported with."""
    records = llava_records(root)
    tag = "broken" if broken else "clean"
    out = root / tag
    out.mkdir(exist_ok=True)
    if kind in ("chat_json", "chat_jsonl"):
        rows = [
            {"id": r["id"], "messages": to_messages(r["conversations"]), "images": [r["image"]]}
            for r in records
        ]
        inline = to_messages(records[0]["conversations"])  # the image inline in its part
        inline[0]["content"][0] = {"type": "image", "image": records[0]["image"]}
        rows.append({"id": "inline", "messages": inline})
        rows.append({"id": "plain", "messages": [{"role": "user", "content": "Say hi."},
                                                 {"role": "assistant", "content": "hi"}]})  # fmt: skip
        if broken and kind == "chat_json":  # an unsupported part type
            rows.append({"id": "bad", "messages": [
                {"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "What happens?"}]},
                {"role": "assistant", "content": "Nothing."}]})  # fmt: skip
        if broken and kind == "chat_jsonl":  # an image in an assistant turn
            answer = [{"type": "image"}, {"type": "text", "text": "Here."}]
            rows.append({"id": "bad", "images": [records[1]["image"]], "messages": [
                {"role": "user", "content": [{"type": "text", "text": "Draw it."}]},
                {"role": "assistant", "content": answer}]})  # fmt: skip
        path = root / f"{tag}_{kind}.{kind[5:]}"  # next to images/: paths resolve from the file's directory
        text = json.dumps(rows) if kind == "chat_json" else "\n".join(json.dumps(r) for r in rows) + "\n"
        path.write_text(text)
        return str(path), "bad_value" if kind == "chat_json" else "placeholder_mismatch"
    if kind == "chat_hf_disk":
        hf_rows(root, records, _bad_hf(root, records[0], "audio") if broken else None).save_to_disk(
            out / kind
        )
        return str(out / kind), "bad_value"
    if kind == "chat_hf_parquet":
        (out / kind).mkdir(exist_ok=True)
        hf_rows(root, records, _bad_hf(root, records[0], "two") if broken else None).to_parquet(
            out / kind / "data-00000.parquet"
        )
        return str(out / kind), "placeholder_mismatch"
    if kind in ("split", "hub_root"):  # a hub snapshot: data/<split>-*.parquet, or <config>/<split>-*.parquet
        hub = out / kind
        folder = hub / ("data" if kind == "split" else "en")
        folder.mkdir(parents=True, exist_ok=True)
        hf_rows(root, records[:2], None).to_parquet(folder / "validation-00000-of-00001.parquet")
        bad = _bad_hf(root, records[0], "two") if broken else None
        name = "test" if kind == "split" else "train"
        hf_rows(root, records, bad).to_parquet(folder / f"{name}-00000-of-00001.parquet")
        (hub / "README.md").write_text("---\nlicense: mit\n---\n")
        return str(hub) + ("#test" if kind == "split" else ""), "placeholder_mismatch"
    samples: list[tuple[str, dict[str, bytes]]] = []
    if kind == "chat_tar":
        for r in records:
            obj = {"id": r["id"], "messages": to_messages(r["conversations"])}
            samples.append((r["id"], {"json": json.dumps(obj).encode(), "png": _png(root, r)}))
        if broken:  # a text part without text
            msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text"}]},
                    {"role": "assistant", "content": "x"}]  # fmt: skip
            samples.append(
                ("bad", {"json": json.dumps({"messages": msgs}).encode(), "png": _png(root, records[0])})
            )
        reason = "bad_value"
    elif kind == "llava_tar":  # LLaVA records verbatim: "image" is the original path
        samples = [
            (f"{i:06d}", {"json": json.dumps(r).encode(), "png": _png(root, r)})
            for i, r in enumerate(records)
        ]
        if broken:  # two image paths, one image member
            bad = {**records[0], "id": "bad", "image": ["coco/a.png", "coco/b.png"]}
            samples.append(("bad", {"json": json.dumps(bad).encode(), "png": _png(root, records[0])}))
        reason = "missing_image"
    elif kind in ("caption_tar", "caption_meta_tar"):  # img2dataset: jpg + txt (or not) + metadata json
        for i, r in enumerate(records):
            meta = _caption_meta(i, r)
            txt = {"txt": meta["caption"].encode()} if kind == "caption_tar" else {}
            samples.append(
                (f"{i:09d}", {"jpg": _jpeg(_png(root, r)), **txt, "json": json.dumps(meta).encode()})
            )
        if broken:  # an empty caption
            empty = {"txt": b"  \n"} if kind == "caption_tar" else {"json": b'{"caption": "  "}'}
            samples.append(("bad", {"jpg": _jpeg(_png(root, records[0])), **empty}))
        reason = "empty_text"
    elif kind in ("caption_jsonl", "caption_hf"):  # {"image", "caption"} records, the same JPEGs
        rows = []
        for i, r in enumerate(records):
            (out / f"{i:09d}.jpg").write_bytes(_jpeg(_png(root, r)))
            meta = _caption_meta(i, r)
            rows.append({"id": f"shard-000000.tar/{i:09d}", "image": f"{tag}/{i:09d}.jpg",
                         "caption": meta["caption"], "url": meta["url"]})  # fmt: skip
        if kind == "caption_jsonl":
            if broken:  # a caption that is not a string
                rows.append({"id": "bad", "image": rows[0]["image"], "caption": ["a", "list"]})
            path = root / f"{tag}_{kind}.jsonl"
            path.write_text("".join(json.dumps(r) + "\n" for r in rows))
            return str(path), "bad_value"
        if broken:  # an empty caption
            rows.append({**rows[0], "id": "bad", "caption": " "})
        for r in rows:
            r["image"] = {"bytes": (root / r["image"]).read_bytes(), "path": None}
        (out / kind).mkdir(exist_ok=True)
        text = datasets.Value("string")
        feats = {"id": text, "image": datasets.Image(), "caption": text, "url": text}
        datasets.Dataset.from_list(rows, features=datasets.Features(feats)).to_parquet(
            out / kind / "train-00000-of-00001.parquet"
        )
        return str(out / kind), "empty_text"
    elif kind == "mixture":  # JSON + tar shards + a split of a hub dataset
        members = [
            {"path": write_layout("chat_json", root, False)[0]},
            {"path": write_layout("llava_tar", root, broken)[0], "weight": 2, "id_prefix": "tar/"},
            {
                "path": write_layout("split", root, False)[0].split("#")[0],
                "split": "test",
                "sampling": "first:3",
                "id_prefix": "hub/",
            },
        ]
        path = root / f"{tag}_mix.yaml"
        path.write_text(yaml.safe_dump({"seed": 0, "datasets": members}))
        return str(path), "missing_image"
    else:
        raise ValueError(kind)
    (out / kind).mkdir(exist_ok=True)
    write_tar_samples(str(out / kind / "shard-000000.tar"), samples)
    return str(out / kind), reason


CAPTION_KINDS = ["caption_tar", "caption_meta_tar", "caption_jsonl", "caption_hf"]
KINDS = [
    "chat_json", "chat_jsonl", "chat_hf_disk", "chat_hf_parquet", "chat_tar", "llava_tar", *CAPTION_KINDS,
    "mixture", "split", "hub_root",
]  # fmt: skip
