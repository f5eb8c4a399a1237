"""The README's Python example runs (hub id swapped for a local tiny checkpoint, images generated)."""

from __future__ import annotations

import re
from pathlib import Path

from PIL import Image

import hf_tiny

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_example_runs(tmp_path, monkeypatch):
    code = re.search(r"```python\n(.*?)```", README.read_text(), re.S).group(1)
    ckpt = hf_tiny.save("dinov2", tmp_path)
    Image.new("RGB", (300, 100), "red").save(tmp_path / "wide.jpg")
    Image.new("RGB", (90, 260), "blue").save(tmp_path / "tall.png")
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(code.replace("facebook/dinov2-small", str(ckpt)), scope)
    assert scope["feats"].shape[0] == scope["batch"].patches.shape[0]
    assert scope["pooled"].shape == (2, 32)
    assert (tmp_path / "my-vit" / "model.safetensors").is_file()


def test_readme_embedder_example_runs(tmp_path, monkeypatch):
    import cmpt
    from vlm_fixtures import build_dirs, build_vlm

    code = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)[1]
    cmpt.Embedder(build_vlm(build_dirs(tmp_path / "m"))).save_pretrained(tmp_path / "my-embedder")
    Image.new("RGB", (120, 80), "green").save(tmp_path / "chart.png")
    monkeypatch.chdir(tmp_path)
    scope: dict = {"cmpt": cmpt, "Image": Image}
    exec(code, scope)
    assert scope["vecs"].shape[0] == 2
