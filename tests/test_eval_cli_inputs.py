"""`cmpt eval ...` refuses bad arguments with one line and exit 2, before any model is loaded.

Most cases pass a ``--model`` that does not exist: a check that ran after loading would report
that instead of the option at fault.
"""

from __future__ import annotations

import json

import pytest
import torch

from cmpt import NativeViT, NativeViTConfig
from cmpt.cli import main
from cmpt.demo.synthetic import generate_splits
from cmpt.embed.embedder import Embedder
from cmpt.eval.runtime import available_devices, check_out_dir, pick_device, results_file

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


@pytest.mark.parametrize("command", ["probe", "seg", "vqa", "retrieval", "resolution"])
@pytest.mark.parametrize(("value", "pixels"), [("0", None), ("-5", None), ("100", "100"), ("20*20", "400")])
def test_max_pixels_below_one_merge_window_is_refused_first(
    command, value, pixels, tiny_vit, tmp_path, capsys
):
    # data that does not exist: a check after loading anything would report it instead
    args = ["eval", command, "--model", str(tiny_vit), "--data", str(tmp_path / "nodata")]
    args += ["--out", str(tmp_path / "o")] if command == "resolution" else []
    assert main([*args, "--max-pixels", value]) == 2
    err = _error(capsys)
    assert f"--max-pixels {value!r}" in err or f"got {value!r}" in err
    assert "784 (28*28)" in err  # patch 14 × merge 2: the smallest value this model accepts
    if pixels:
        assert f"{pixels} pixels is less than one 28×28 merge window" in err


def test_max_pixels_checks_without_a_readable_model(tmp_path, capsys):
    args = ["eval", "probe", "--model", str(tmp_path / "nope"), "--data", str(tmp_path)]
    assert main([*args, "--max-pixels", "0"]) == 2
    assert "--max-pixels must be positive" in (err := _error(capsys)) and "'0'" in err
    assert main([*args, "--max-pixels", "224*224,448*448"]) == 2  # one value, not a sweep
    assert "one pixel count or product" in (err := _error(capsys)) and "cmpt eval resolution" in err


def test_max_pixels_takes_a_product(tmp_path, tiny_vit, capsys):
    data = generate_splits("scenes", tmp_path / "scenes", 4, 2, 1)["train"].parent
    out = tmp_path / "probe.json"
    args = ["eval", "probe", "--model", str(tiny_vit), "--data", str(data), "--out", str(out)]
    assert main([*args, "--max-pixels", "28*56"]) == 0
    assert json.loads(out.read_text())["n_val"] == 2


def test_mps_index_zero_is_accepted_where_mps_is(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert pick_device("mps:0") == torch.device("mps:0") and pick_device("mps") == torch.device("mps")
    assert {"mps", "mps:0"} <= set(available_devices())
    with pytest.raises(ValueError, match=r"'mps:1'.*MPS has one device.*use one of: auto, cpu.*mps:0"):
        pick_device("mps:1")
    # the device passes; what is reported is the missing data
    assert main([*_args("probe", tmp_path), "--device", "mps:0"]) == 2
    assert "not available" not in (err := _error(capsys)) and "does not exist" in err


def test_unavailable_mps_lists_the_usable_devices(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert main([*_args("seg", tmp_path), "--device", "mps:0"]) == 2
    err = _error(capsys)
    assert "--device 'mps:0' is not available here (MPS is not available); use one of: auto, cpu" in err
