"""What a fresh user meets on the command line (docs/data.md, docs/method.md §5): `cmpt eval --out`
never replaces a file it did not write; absolute image paths name their fix; `cmpt data vocab-prior`
reads every form `data.path` takes; a missing image root or `--data` is one line up front; a fixed
resolution that overrides `--max-pixels` is reported; `cmpt data synth --help` tells the sizes.
Every refusal is one line, exit 2, before any model loads (the models passed do not exist)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from PIL import Image
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from cmpt import NativeViT, NativeViTConfig
from cmpt.cli import main
from cmpt.data.open import open_source
from cmpt.data.sources import BadSample, resolve_image_path
from cmpt.data.vocab_prior import caption_texts_from_llava, count_tokens, load_vocab_counts
from cmpt.demo.synthetic import generate, generate_splits
from cmpt.eval.resolution import resolution_sweep
from cmpt.eval.runtime import RESULT_MARKER
from cmpt.eval.vqa import evaluate_vqa
from cmpt.vision.processor import ImageProcessor

pytestmark = pytest.mark.usefixtures("one_thread")


def _error(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("cmpt ")]
    assert len(lines) == 1, err
    return lines[0]


@pytest.fixture(scope="module")
def scenes(tmp_path_factory) -> Path:
    return generate_splits("scenes", tmp_path_factory.mktemp("ux") / "scenes", 4, 2, 2)["train"].parent


@pytest.fixture(scope="module")
def tiny_vit(tmp_path_factory) -> Path:
    vit = NativeViT(
        NativeViTConfig(hidden_size=32, num_layers=1, num_heads=4, intermediate_size=64, pos_grid=4)
    )
    out = tmp_path_factory.mktemp("ux_vit") / "vit"
    vit.save_pretrained(out)
    return out


# --------------------------------------------------------------------------- 1. eval --out
FILE_COMMANDS = ("probe", "seg", "retrieval")


@pytest.mark.parametrize("command", FILE_COMMANDS)
@pytest.mark.parametrize("into_dir", [False, True])
def test_eval_out_never_replaces_a_users_file(command, into_dir, scenes, tmp_path, capsys):
    user = tmp_path / "userdir"
    user.mkdir()
    mine = user / (f"{command}_results.json" if into_dir else "notes.txt")
    mine.write_text("my notes, not results\n")
    out = f"{user}/" if into_dir else str(mine)
    args = ["eval", command, "--model", str(tmp_path / "nope"), "--data", str(scenes), "--out", out]
    assert main(args) == 2
    line = _error(capsys)
    assert f"--out: {mine} exists and is not an earlier `cmpt eval {command}` result" in line
    assert "choose another --out" in line
    assert mine.read_text() == "my notes, not results\n"


@pytest.mark.parametrize(
    ("command", "name"),
    [
        ("vqa", "predictions.jsonl"),
        ("vqa", "vqa_results.json"),
        ("resolution", "resolution_sweep.md"),
        ("resolution", "predictions_3136.jsonl"),
        ("resolution", "resolution_sweep.png"),
        ("embed", "embed_results.json"),
        ("embed", "embed_results.png"),
    ],
)
def test_eval_out_directory_never_replaces_a_users_file(command, name, scenes, tmp_path, capsys):
    user = tmp_path / "userdir"
    user.mkdir()
    if name.endswith(".png"):
        Image.new("RGB", (8, 8), "red").save(user / name)  # a user's picture, no cmpt stamp
    else:
        (user / name).write_text('{"mine": true}\n')
    before = (user / name).read_bytes()
    args = ["eval", command, "--model", str(tmp_path / "nope"), "--data", str(scenes), "--out", str(user)]
    args += ["--max-pixels", "56*56"] if command == "resolution" else []
    assert main(args) == 2
    line = _error(capsys)
    assert f"{user / name} exists and is not an earlier `cmpt eval {command}` result" in line
    assert (user / name).read_bytes() == before


@pytest.mark.parametrize(
    "earlier",
    [
        {"top1": 0.5, "setting": {}, "grid": [], "n_val": 2},  # written before the marker
        {"top1": 0.5, RESULT_MARKER: {"command": "eval probe", "version": "0"}},
        "",  # an empty file holds nothing to lose
    ],
)
def test_eval_out_replaces_an_earlier_result_of_the_command(earlier, scenes, tmp_path, capsys):
    out = tmp_path / "probe.json"
    out.write_text(earlier if isinstance(earlier, str) else json.dumps(earlier))
    args = ["eval", "probe", "--model", str(tmp_path / "nope"), "--data", str(scenes), "--out", str(out)]
    assert main(args) == 2
    line = _error(capsys)  # the --out check passed: the model is what is missing
    assert "nope does not exist" in line and "--out" not in line


def test_eval_out_refuses_another_commands_result(scenes, tmp_path, capsys):
    out = tmp_path / "r.json"
    out.write_text(json.dumps({"top1": 0.5, RESULT_MARKER: {"command": "eval probe"}}))
    args = ["eval", "retrieval", "--model", str(tmp_path / "nope"), "--data", str(scenes), "--out", str(out)]
    assert main(args) == 2
    assert "not an earlier `cmpt eval retrieval` result" in _error(capsys)


def test_probe_result_is_marked_and_rerun_in_place(scenes, tiny_vit, tmp_path, capsys):
    out = tmp_path / "probe.json"
    args = ["eval", "probe", "--model", str(tiny_vit), "--data", str(scenes), "--out", str(out)]
    assert main(args) == 0 and main(args) == 0  # the second run replaces its own result
    res = json.loads(out.read_text())
    assert res[RESULT_MARKER]["command"] == "eval probe" and res["n_val"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["probe.json"]  # no temporary left


def test_data_check_out_never_replaces_a_users_file(scenes, tmp_path, capsys):
    mine = tmp_path / "notes.txt"
    mine.write_text("mine")
    assert main(["data", "check", str(scenes / "train.json"), "--out", str(mine)]) == 2
    assert "not an earlier bad-sample list" in _error(capsys) and mine.read_text() == "mine"


# --------------------------------------------------------------------------- 2. absolute image paths
def _absolute_copy(split: Path, out: Path) -> Path:
    """``split`` with every image path made absolute, written to ``out`` (another folder)."""
    recs = json.loads(split.read_text())
    for r in recs:
        r["image"] = str((split.parent / r["image"]).resolve())
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(recs))
    return out


def test_absolute_path_escape_names_the_fix(tmp_path):
    with pytest.raises(BadSample) as e:
        resolve_image_path(str(tmp_path / "root"), "/elsewhere/a.png", "r1")
    assert e.value.reason == "path_escape"
    assert "data.image_root: /" in e.value.detail and "--image-root /" in e.value.detail
    with pytest.raises(BadSample) as e:  # a relative escape keeps its message
        resolve_image_path(str(tmp_path / "root"), "../a.png", "r2")
    assert e.value.reason == "path_escape" and "--image-root" not in e.value.detail
    assert resolve_image_path("/", "/elsewhere/a.png") == "/elsewhere/a.png"


def test_absolute_paths_are_read_with_image_root_slash(scenes, tiny_vit, tmp_path, capsys):
    train = _absolute_copy(scenes / "train.json", tmp_path / "abs" / "train.json")
    _absolute_copy(scenes / "val.json", tmp_path / "abs" / "val.json")
    assert main(["data", "check", str(train)]) == 1
    report = capsys.readouterr().out  # the summary names the first bad sample's fix
    assert "path_escape" in report and "--image-root /" in report and "data.image_root: /" in report
    assert main(["data", "check", str(train), "--image-root", "/"]) == 0
    probe = ["eval", "probe", "--model", str(tiny_vit), "--data", str(train.parent)]
    assert main(probe) == 2
    assert "path_escape" in (line := _error(capsys)) and "--image-root /" in line
    assert main([*probe, "--image-root", "/"]) == 0


# --------------------------------------------------------------------------- 3. vocab-prior
RECORDS = [
    {
        "image": "x.png",
        "conversations": [{"from": "human", "value": "<image>\nQ?"}, {"from": "gpt", "value": "a red bar"}],
    },
    {"image": "y.png", "caption": "the cat on a mat"},  # an image–caption record: its caption counts
]


def _tokenizer(tmp_path: Path) -> Path:
    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(
        ["a red bar the cat on a mat"] * 3, trainers.BpeTrainer(vocab_size=40, special_tokens=["[UNK]"])
    )
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(tmp_path / "tok")
    return tmp_path / "tok"


def test_vocab_prior_reads_a_mixture_yaml(tmp_path, capsys):
    tok = _tokenizer(tmp_path)
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps(r) for r in RECORDS) + "\n")
    mix = tmp_path / "train.yaml"
    mix.write_text("datasets:\n  - path: a.jsonl\n  - path: a.jsonl\n    id_prefix: 'b/'\n")
    out = tmp_path / "p.safetensors"
    assert main(["data", "vocab-prior", str(mix), "--tokenizer", str(tok), "--out", str(out)]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["num_records"] == 4 and summary["num_texts"] == 4 and summary["num_bad"] == 0
    texts = [*caption_texts_from_llava(RECORDS[:1]), RECORDS[1]["caption"]] * 2
    expected = count_tokens(texts, PreTrainedTokenizerFast.from_pretrained(tok))
    assert torch.equal(load_vocab_counts(out), expected)


def test_vocab_prior_of_documents_and_over_a_users_file(tmp_path, capsys):
    tok = _tokenizer(tmp_path)
    docs = tmp_path / "docs.jsonl"
    docs.write_text(json.dumps({"text": "a passage"}) + "\n")
    out = tmp_path / "p.safetensors"
    assert main(["data", "vocab-prior", str(docs), "--tokenizer", str(tok), "--out", str(out)]) == 2
    assert "no caption tokens" in (line := _error(capsys)) and "documents" in line
    mine = tmp_path / "notes.txt"
    mine.write_text("mine")
    (tmp_path / "a.json").write_text(json.dumps(RECORDS))
    assert (
        main(["data", "vocab-prior", str(tmp_path / "a.json"), "--tokenizer", str(tok), "--out", str(mine)])
        == 2
    )
    assert "not a vocab-counts file" in _error(capsys) and mine.read_text() == "mine"


# --------------------------------------------------------------------------- 4. missing inputs, up front
def test_missing_image_root_is_one_line(scenes, tmp_path, capsys):
    missing = tmp_path / "nonexistent"
    assert main(["data", "check", str(scenes / "train.json"), "--image-root", str(missing)]) == 2
    line = _error(capsys)
    assert f"--image-root '{missing}' does not exist" in line  # one line, not a missing_image per record
    with pytest.raises(FileNotFoundError, match=r"^data\.image_root .* does not exist"):
        open_source(scenes / "train.json", missing)
    mix = tmp_path / "mix.yaml"
    mix.write_text(f"datasets:\n  - path: {scenes / 'train.json'}\n    image_root: nonexistent\n")
    with pytest.raises(FileNotFoundError, match=r"datasets\[0\]\.image_root .* does not exist"):
        open_source(mix)
    (tmp_path / "f").write_text("x")
    with pytest.raises(NotADirectoryError, match="is a file, not a folder"):
        open_source(scenes / "train.json", tmp_path / "f")


@pytest.mark.parametrize("command", ["probe", "seg", "vqa", "resolution", "retrieval"])
def test_eval_missing_data_and_image_root_before_the_model(command, scenes, tmp_path, capsys):
    model = tmp_path / "vlm"  # passes retrieval's look at the directory; loading it would fail
    model.mkdir()
    (model / "vlm_config.json").write_text("{}")
    base = ["eval", command, "--model", str(model)]
    base += ["--max-pixels", "56*56", "--out", str(tmp_path / "o")] if command == "resolution" else []
    assert main([*base, "--data", str(tmp_path / "nodata")]) == 2
    assert "--data" in (line := _error(capsys)) and "does not exist" in line
    assert main([*base, "--data", str(scenes), "--image-root", str(tmp_path / "nonexistent")]) == 2
    assert "--image-root" in (line := _error(capsys)) and "does not exist" in line


# --------------------------------------------------------------------------- 5. fixed resolution
class FixedVLM:
    """A model whose processor resizes every image to 112×112 (the official force_resize)."""

    def __init__(self) -> None:
        self.processor = ImageProcessor(
            14, 2, min_pixels=28 * 28, max_pixels=2352000, policy="fixed", fixed_size=112
        )

    def generate_batch(self, items, *, processor=None, max_new_tokens=64, system=None):
        return ["zzzz"] * len(items)


@pytest.fixture(scope="module")
def charts(tmp_path_factory) -> Path:
    return generate("charts", 2, tmp_path_factory.mktemp("ux_charts"), split="test")


def test_fixed_resolution_overrides_max_pixels_and_says_so(charts, tmp_path, caplog):
    r = evaluate_vqa(FixedVLM(), charts, max_pixels=224 * 224)
    assert r["fixed_resolution"] == "112x112" and r["max_pixels"] == 112 * 112
    assert r["requested_max_pixels"] == 224 * 224 and r["mean_vision_tokens"] == 16.0
    r = evaluate_vqa(FixedVLM(), charts)  # no request: the processor's own cap, reported as such
    assert r["max_pixels"] == 112 * 112 and r["requested_max_pixels"] == 2352000
    small = evaluate_vqa(FixedVLM(), charts, max_pixels=56 * 56)  # a smaller cap still lowers it
    assert small["max_pixels"] == 56 * 56 and "requested_max_pixels" not in small
    with caplog.at_level(logging.WARNING, logger="cmpt.eval"):
        sweep = resolution_sweep(FixedVLM(), charts, [56 * 56, 224 * 224], out_dir=tmp_path)
    p56, p224 = sweep["points"]
    assert (p56["requested_max_pixels"], p56["max_pixels"]) == (3136, 3136)
    assert (p224["requested_max_pixels"], p224["max_pixels"]) == (50176, 12544)
    assert p224["fixed_resolution"] == "112x112" and p224["mean_vision_tokens"] == 16.0
    assert "| 50176 | 112x112 (fixed) | 16.0 |" in sweep["table"] and "Note: " in sweep["table"]
    warnings = [r.getMessage() for r in caplog.records if "fixed resolution" in r.getMessage()]
    assert len(warnings) == 1 and "112x112" in warnings[0] and "50176" in warnings[0]
    saved = json.loads((tmp_path / "resolution_sweep.json").read_text())
    assert saved["points"][1]["max_pixels"] == 12544 and saved[RESULT_MARKER]["command"] == "eval resolution"
    # a rerun into the same directory replaces its own outputs (the PNG is stamped)
    resolution_sweep(FixedVLM(), charts, [56 * 56, 224 * 224], out_dir=tmp_path)


# --------------------------------------------------------------------------- 6. synth --help
def test_synth_help_tells_each_kinds_sizes(capsys):
    with pytest.raises(SystemExit):
        main(["data", "synth", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "val/test get n//4" not in text
    assert "max(1, n//4)" in text and "max(1, n//5)" in text and "max(8, n//25)" in text
    splits_help = text.split("--splits SPLITS", 2)[-1]
    assert "NAME:COUNT" in splits_help and "ignore it" in splits_help
