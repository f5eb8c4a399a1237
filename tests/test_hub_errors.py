"""Hub ids that are not cached, offline (cmpt.hub): one line naming the installed huggingface_hub's
download command and HF_HUB_OFFLINE, from every cmpt loader and from the CLI (exit 2)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from huggingface_hub import constants

import cmpt
from cmpt.hub import HubOfflineError, cli_for, download_command, is_hub_id, local_model_dir
from vlm_fixtures import build_dirs

FAKE = "cmpt-test-nobody/no-such-model"


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """HF_HUB_OFFLINE=1 with an empty cache (huggingface_hub reads both when it is imported)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))


def test_download_command_of_the_installed_hub():
    from importlib.metadata import distribution

    scripts = {ep.name for ep in distribution("huggingface_hub").entry_points}
    want = "hf" if "hf" in scripts else "huggingface-cli"
    assert download_command("a/b") == f"{want} download a/b"
    assert cli_for({"hf", "tiny-agents"}, "1.0.0") == "hf"
    assert cli_for({"huggingface-cli"}, "0.30.0") == "huggingface-cli"
    assert cli_for(set(), "0.34.1") == "hf" and cli_for(set(), "0.20.3") == "huggingface-cli"


def test_hub_ids_and_paths(tmp_path):
    assert is_hub_id("Qwen/Qwen2.5-VL-3B-Instruct") and is_hub_id(FAKE)
    assert not is_hub_id(str(tmp_path)) and not is_hub_id("runs/tiny/final") and not is_hub_id("./x")
    assert local_model_dir(tmp_path) == tmp_path


def _one_line(err: pytest.ExceptionInfo) -> str:
    msg = str(err.value)
    assert "\n" not in msg
    assert f"{download_command(FAKE)}" in msg and "HF_HUB_OFFLINE" in msg and repr(FAKE) in msg
    return msg


@pytest.mark.parametrize("loader", ["vit", "vit_hf", "vlm", "embedder"])
def test_every_loader_names_the_command(offline, loader):
    load = {
        "vit": cmpt.NativeViT.from_pretrained,
        "vit_hf": cmpt.NativeViT.from_hf,
        "vlm": cmpt.VisionLanguageModel.from_pretrained,
        "embedder": cmpt.Embedder.from_pretrained,
    }[loader]
    with pytest.raises(HubOfflineError) as err:
        load(FAKE)
    _one_line(err)


def test_build_with_a_hub_llm(offline, tmp_path):
    dirs = build_dirs(tmp_path / "d")
    with pytest.raises(HubOfflineError) as err:
        cmpt.VisionLanguageModel.build(dirs / "vit", FAKE)
    assert _one_line(err).startswith("language model")
    with pytest.raises(HubOfflineError) as err:
        cmpt.VisionLanguageModel.build(FAKE, dirs / "qwen2")
    assert _one_line(err).startswith("vision checkpoint")


@pytest.mark.slow
def test_cli_prints_one_line_and_exits_2(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub")}
    cmd = [sys.executable, "-m", "cmpt", "export", FAKE, "--out", str(tmp_path / "out")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    [line] = [x for x in proc.stderr.splitlines() if x.startswith("cmpt export: error:")]
    assert download_command(FAKE) in line and "HF_HUB_OFFLINE" in line
