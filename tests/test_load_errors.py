"""User mistakes in what cmpt loads get one clear error naming the file, sample or key and the fix,
never a traceback of a library (docs/method.md §4 "Bad samples"; cmpt.hub): a mixture YAML that does
not parse or names a missing member, a truncated ``.safetensors``, a malformed ``config.json``, a
local model or data path that does not exist (not a hub id), a probe data set that does not exist
or holds a corrupt image. Through the CLI (exit 2, one ``cmpt ...: error:`` line) and the Python API."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from PIL import Image

import hf_tiny
from cmpt.cli import main
from cmpt.data.mixture import load_mixture
from cmpt.data.open import open_source
from cmpt.eval.features import resolve_split_files
from cmpt.hub import CorruptFileError, check_local_path, is_hub_id
from cmpt.vision.official_release import read_keys
from cmpt.vision.vit import NativeViT
from cmpt.vlm.model import VisionLanguageModel
from vlm_fixtures import build_dirs, build_vlm


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """A tiny LM (``lm``), NativeViT (``vit``), HF DINOv2 (``hf``) and a saved VLM (``vlm``)."""
    root = tmp_path_factory.mktemp("models")
    dirs = build_dirs(root / "d")
    build_vlm(dirs).save_pretrained(root / "vlm")
    return {
        "lm": dirs / "qwen2",
        "vit": dirs / "vit",
        "hf": hf_tiny.save("dinov2", root),
        "vlm": root / "vlm",
    }


def cli_error(capsys: pytest.CaptureFixture, argv: list[str]) -> str:
    """Run the CLI, expect the usage exit code 2 and return its one error line."""
    assert main(argv) == 2
    [line] = [x for x in capsys.readouterr().err.splitlines() if x.startswith("cmpt ")]
    return line


def copy_truncated(src: Path, dst: Path, weights: str, size: int) -> Path:
    """A copy of the model directory ``src`` whose file ``weights`` is cut to ``size`` bytes."""
    shutil.copytree(src, dst)
    with open(dst / weights, "r+b") as fh:
        fh.truncate(size)
    return dst / weights


# ----------------------------------------------------------------------------- mixtures and data.path
def test_mixture_yaml_syntax_error_names_file_and_line(tmp_path, capsys):
    mix = tmp_path / "mix.yaml"
    mix.write_text("datasets: [\n")
    with pytest.raises(ValueError, match=rf"{mix}: not valid YAML .*line 2"):
        load_mixture(mix)
    line = cli_error(capsys, ["data", "check", str(mix)])
    assert str(mix) in line and "line 2" in line


def test_mixture_member_errors_name_file_and_member(tmp_path, capsys):
    mix = tmp_path / "mix.yaml"
    mix.write_text("datasets:\n  - {path: a.json}\n  - {path: nope.json}\n")
    (tmp_path / "a.json").write_text("[]")
    with pytest.raises(FileNotFoundError, match=rf"{mix}: datasets\[1\]\.path .*nope\.json does not exist"):
        load_mixture(mix)
    line = cli_error(capsys, ["data", "check", str(mix)])
    assert "datasets[1].path" in line and "does not exist" in line
    mix.write_text('datasets:\n  - {path: a.json, sampling: "random:abc"}\n')
    with pytest.raises(ValueError, match=rf"{mix}: datasets\[0\]: sampling .*'random:abc'"):
        load_mixture(mix)


def test_missing_data_path_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=rf"data\.path {tmp_path}/nope\.json does not exist"):
        open_source(tmp_path / "nope.json")
    with pytest.raises(FileNotFoundError, match=rf"data\.path {tmp_path}/nope does not exist"):
        open_source(str(tmp_path / "nope"))


# ----------------------------------------------------------------------------- truncated weights
def test_truncated_weights_name_the_file(models, tmp_path, capsys):
    vit_file = copy_truncated(models["vit"], tmp_path / "vit", "model.safetensors", 1000)
    with pytest.raises(CorruptFileError, match=rf"{vit_file} is truncated or corrupt \(1000 bytes"):
        NativeViT.from_pretrained(tmp_path / "vit")
    hf_file = copy_truncated(models["hf"], tmp_path / "hf", "model.safetensors", 5000)
    with pytest.raises(CorruptFileError, match=rf"{hf_file} is truncated or corrupt \(5000 bytes"):
        NativeViT.from_hf(tmp_path / "hf")  # read by transformers' from_pretrained
    with pytest.raises(CorruptFileError, match=rf"{hf_file} is truncated"):
        read_keys(tmp_path / "hf")  # the release's layout detection (safe_open)
    assert str(hf_file) in cli_error(
        capsys, ["convert", "official", str(tmp_path / "hf"), str(tmp_path / "o")]
    )


def test_truncated_vlm_parts_name_the_file(models, tmp_path, capsys):
    merger = copy_truncated(models["vlm"], tmp_path / "m", "merger.safetensors", 100)
    with pytest.raises(CorruptFileError, match=rf"{merger} is truncated or corrupt \(100 bytes"):
        VisionLanguageModel.from_pretrained(tmp_path / "m")
    assert f"{merger} is truncated" in cli_error(
        capsys, ["export", str(tmp_path / "m"), "--out", str(tmp_path / "x")]
    )
    lm = copy_truncated(models["vlm"], tmp_path / "l", "llm/model.safetensors", 3000)
    with pytest.raises(CorruptFileError, match=rf"{lm} is truncated or corrupt \(3000 bytes.*re-download"):
        VisionLanguageModel.from_pretrained(tmp_path / "l")  # the LLM: transformers' from_pretrained


# ----------------------------------------------------------------------------- local paths vs hub ids
def test_path_like_names_that_do_not_exist_are_not_hub_ids(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    check_local_path("facebook/dinov2-small", "vision checkpoint")  # a hub id: left to the hub
    assert is_hub_id("facebook/dinov2-small")
    for name in (str(tmp_path / "lm"), "./lm", "../lm", "~/no-such-cmpt-model", "a/b/c"):
        with pytest.raises(FileNotFoundError, match=rf"language model {name} does not exist: check the path"):
            check_local_path(name, "language model")


def test_missing_model_paths_are_named(models, tmp_path, monkeypatch, capsys):
    missing = str(tmp_path / "nonexist")
    with pytest.raises(FileNotFoundError, match=rf"^language model {missing} does not exist"):
        VisionLanguageModel.build(models["vit"], missing)
    with pytest.raises(FileNotFoundError, match=rf"^vision checkpoint {missing} does not exist"):
        VisionLanguageModel.build(missing, models["lm"])
    img = tmp_path / "x.png"
    Image.new("RGB", (28, 28)).save(img)
    line = cli_error(
        capsys, ["encode", "--model", missing, str(img), "--out", str(tmp_path / "f.safetensors")]
    )
    assert f"vision checkpoint {missing} does not exist" in line
    data = tmp_path / "d.json"
    data.write_text("[]")
    argv = [
        "data",
        "vocab-prior",
        str(data),
        "--tokenizer",
        missing,
        "--out",
        str(tmp_path / "v.safetensors"),
    ]
    assert f"{missing} does not exist" in cli_error(capsys, argv)
    shutil.copytree(models["vlm"], tmp_path / "vlm")
    shutil.rmtree(tmp_path / "vlm" / "llm")
    monkeypatch.chdir(tmp_path)  # "vlm/llm" has the form of a hub id: must not go to the hub
    with pytest.raises(FileNotFoundError, match=r"the VLM's llm vlm/llm does not exist: vlm is incomplete"):
        VisionLanguageModel.from_pretrained("vlm")


def test_tiny_recipe_without_demo_says_run_demo(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("CMPT_CACHE", str(tmp_path / "cache"))
    line = cli_error(capsys, ["train", "tiny/comp_stage1", "--set", f"run.dir={tmp_path / 'run'}"])
    assert f"{tmp_path / 'cache'}/tiny/" in line and "does not exist" in line and "`cmpt demo`" in line


# ----------------------------------------------------------------------------- malformed config.json
def test_malformed_config_json_is_named(models, tmp_path, capsys):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text("{broken")
    with pytest.raises(CorruptFileError, match=rf"{bad}/config\.json: not valid JSON \(line 1, column 2"):
        NativeViT.from_hf(bad)
    with pytest.raises(CorruptFileError, match=rf"{bad}/config\.json"):
        VisionLanguageModel.build(bad, models["lm"])  # model.vision
    assert f"{bad}/config.json: not valid JSON" in cli_error(
        capsys, ["convert", "official", str(bad), str(tmp_path / "o")]
    )


# ----------------------------------------------------------------------------- probes
def test_probe_data_errors(models, tmp_path, capsys):
    missing = tmp_path / "nonexist"
    with pytest.raises(FileNotFoundError, match=rf"--data {missing} does not exist.*--kind scenes --n N"):
        resolve_split_files(missing, None)
    (tmp_path / "t.json").write_text("[]")
    with pytest.raises(ValueError, match=r"is a file: pass the validation JSON too \(--val"):
        resolve_split_files(tmp_path / "t.json", None)
    from cmpt.demo.synthetic import generate

    data = tmp_path / "scenes"
    for split in ("train", "val"):
        generate("scenes", 2, data, split=split)
    bad = next((data / "images" / "train").iterdir())
    bad.write_text("junk")
    rid = next(r["id"] for r in json.loads((data / "train.json").read_text()) if bad.name in r["image"])
    argv = ["eval", "probe", "--model", str(models["vit"]), "--data", str(data), "--out", str(tmp_path / "p")]
    line = cli_error(capsys, argv)
    assert f"record {rid!r}" in line and str(bad) in line and "cmpt data check" in line


def test_a_jsonl_rewritten_while_read_stops_with_its_name(tmp_path: Path) -> None:
    """Records are read back by byte offset: a file changed mid-run must not yield other lines."""
    from cmpt.data.llava_source import LlavaSource

    path = tmp_path / "data.jsonl"
    rows = [{"id": f"r{i}", "conversations": [{"from": "gpt", "value": f"answer {i}"}]} for i in range(3)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    source = LlavaSource(path)
    assert source[1].id == "r1"
    path.write_text("".join(json.dumps({**r, "extra": "field"}) + "\n" for r in rows))
    with pytest.raises(ValueError, match=r"data\.jsonl changed while it was being read"):
        source[1]
    assert LlavaSource(path)[1].id == "r1"  # opened again, the new file reads fine


def test_hf_conversion_reports_a_missing_image_instead_of_failing(tmp_path: Path) -> None:
    """The HF format embeds image bytes: a record whose image is missing is skipped and reported
    (datasets used to fail on the dangling path, leaving an empty output directory)."""
    pytest.importorskip("datasets")
    from cmpt.data.convert import llava_to_hf
    from cmpt.data.hf_source import HFSource

    (tmp_path / "img").mkdir()
    Image.new("RGB", (8, 8), "red").save(tmp_path / "img" / "a.png")
    turns = [{"from": "human", "value": "<image>what?"}, {"from": "gpt", "value": "red"}]
    rows = [{"id": "ok", "image": "img/a.png", "conversations": turns}]
    rows.append({"id": "gone", "image": "img/none.png", "conversations": turns})
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    for fmt in ("disk", "parquet"):
        out = llava_to_hf(tmp_path / "d.jsonl", tmp_path / fmt, format=fmt)
        assert out["samples"] == 1 and [(s["id"], s["reason"]) for s in out["skipped"]] == [
            ("gone", "missing_image")
        ]
        assert "img/none.png" in out["skipped"][0]["detail"]
        assert [r.id for r in HFSource(out["path"])] == ["ok"]
