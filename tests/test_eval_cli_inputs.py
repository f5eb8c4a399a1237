"""`cmpt eval ...` refuses bad arguments with one line and exit 2, before any model is loaded.

Most cases pass a ``--model`` that does not exist: a check that ran after loading would report
that instead of the option at fault.
"""

from __future__ import annotations

import json

import pytest

from cmpt import NativeViT, NativeViTConfig
from cmpt.cli import main
from cmpt.demo.synthetic import generate_splits
from cmpt.embed.embedder import Embedder
from cmpt.eval.runtime import check_out_dir, results_file

COMMANDS = ("probe", "seg", "vqa", "resolution", "retrieval", "embed")


def _args(command: str, tmp_path, *extra: str) -> list[str]:
    args = ["eval", command, "--model", str(tmp_path / "nope"), "--data", str(tmp_path / "nodata")]
    if command == "resolution":
        args += ["--max-pixels", "56*56", "--out", str(tmp_path / "res")]
    return [*args, *extra]


def _error(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


@pytest.fixture(scope="module")
def tiny_vit(tmp_path_factory):
    root = tmp_path_factory.mktemp("inputs")
    vit = NativeViT(
        NativeViTConfig(hidden_size=32, num_layers=1, num_heads=4, intermediate_size=64, pos_grid=4)
    )
    vit.save_pretrained(root / "vit")
    return root / "vit"


def test_retrieval_refuses_missing_and_non_vlm_model(tmp_path, tiny_vit, capsys):
    base = ["eval", "retrieval", "--data", str(tmp_path)]
    assert main([*base, "--model", str(tmp_path / "nope")]) == 2
    assert "--model" in (err := _error(capsys)) and "does not exist" in err
    assert main([*base, "--model", str(tiny_vit)]) == 2
    assert "not a VLM directory" in (err := _error(capsys)) and "cmpt eval probe" in err


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("device", ["bogus", "cuda:99"])
def test_unusable_device_is_refused_first(command, device, tmp_path, capsys):
    assert main(_args(command, tmp_path, "--device", device)) == 2
    err = _error(capsys)
    assert f"--device {device!r} is not available" in err and "cpu" in err


@pytest.mark.parametrize(
    ("command", "option", "value"),
    [
        ("vqa", "--batch-size", "-1"),
        ("vqa", "--batch-size", "0"),
        ("vqa", "--limit", "-2"),
        ("vqa", "--limit", "0"),
        ("retrieval", "--limit", "0"),
        ("resolution", "--limit", "-1"),
        ("embed", "--batch-tokens", "0"),
        ("embed", "--batch-tokens", "-3"),
    ],
)
def test_counts_must_be_positive(command, option, value, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(_args(command, tmp_path, option, value))
    assert e.value.code == 2
    assert f"argument {option}: expected an integer >= 1, got {value!r}" in _error(capsys)


def test_embedder_encode_refuses_batch_tokens_below_one():
    with pytest.raises(ValueError, match="batch_tokens must be >= 1"):
        Embedder.encode(None, ["a text"], batch_tokens=0)  # checked before the model is touched


def test_resolution_max_pixels_format(tmp_path, capsys):
    args = ["eval", "resolution", "--model", str(tmp_path / "nope"), "--data", str(tmp_path)]
    assert main([*args, "--max-pixels", "56x56", "--out", str(tmp_path / "o")]) == 2
    err = _error(capsys)
    assert "--max-pixels" in err and "'56x56'" in err and '"224*224,448*448"' in err


def test_results_file_inside_a_directory(tmp_path):
    assert results_file(None, "probe") is None
    assert results_file(tmp_path / "r.json", "probe") == tmp_path / "r.json"
    assert results_file(tmp_path, "seg") == tmp_path / "seg_results.json"
    assert results_file(f"{tmp_path / 'new'}/", "probe") == tmp_path / "new" / "probe_results.json"
    (tmp_path / "f").write_text("x")
    with pytest.raises(ValueError, match="is a file"):
        check_out_dir(tmp_path / "f", "vqa")
    check_out_dir(tmp_path / "new_dir", "vqa")


@pytest.mark.parametrize("command", ["vqa", "resolution", "embed"])
def test_directory_out_refuses_an_existing_file(command, tmp_path, capsys):
    (tmp_path / "taken").write_text("keep me")
    args = ["eval", command, "--model", str(tmp_path / "nope"), "--data", str(tmp_path)]
    if command == "resolution":
        args += ["--max-pixels", "56*56"]
    assert main([*args, "--out", str(tmp_path / "taken")]) == 2
    assert "--out" in (err := _error(capsys)) and "is a file" in err and "directory" in err
    assert (tmp_path / "taken").read_text() == "keep me"


@pytest.mark.parametrize("trailing_slash", [True, False])
def test_probe_out_directory_gets_results_json(trailing_slash, tmp_path, tiny_vit, capsys):
    data = generate_splits("scenes", tmp_path / "scenes", 4, 2, 1)["train"].parent
    out = tmp_path / "evals"
    if not trailing_slash:
        out.mkdir()
    arg = f"{out}/" if trailing_slash else str(out)
    assert main(["eval", "probe", "--model", str(tiny_vit), "--data", str(data), "--out", arg]) == 0
    res = json.loads((out / "probe_results.json").read_text())
    assert res["n_val"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["evals", "scenes"]
