"""``cmpt encode --shard-size`` killed (SIGKILL) while writing a shard: the finished shards stay, the
half-written one is only a hidden temporary, and the same command run again keeps the finished
shards, removes the dead writer's temporary and ends with the features of an uninterrupted encode
(docs/method.md §7 "Sharded, resumable encoding")."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import hf_tiny
from cmpt.cli import main

KILL_AT_THIRD_SAVE = """
import os, sys
from pathlib import Path
import cmpt.encode as enc
from cmpt.cli import main
real, calls = enc.save_file, []
def save(tensors, path, metadata=None):
    calls.append(path)
    if len(calls) == 3:
        Path(path).write_bytes(b"the first bytes of a shard")
        os.kill(os.getpid(), 9)
    real(tensors, path, metadata=metadata)
enc.save_file = save
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_killed_encode_resumes_to_the_uninterrupted_features(tmp_path: Path, capsys) -> None:
    ckpt = hf_tiny.save("dinov2", tmp_path)
    folder = tmp_path / "imgs"
    folder.mkdir()
    g = torch.Generator().manual_seed(2)
    for i in range(5):
        pixels = (torch.rand(40 + 14 * i, 60, 3, generator=g) * 255).to(torch.uint8).numpy()
        Image.fromarray(pixels).save(folder / f"{i}.png")
    out = tmp_path / "out" / "f.safetensors"
    args = ["encode", "--model", str(ckpt), str(folder), "--quiet", "--workers", "0", "--out", str(out)]
    killed = subprocess.run([sys.executable, "-c", KILL_AT_THIRD_SAVE, *args, "--shard-size", "1"])
    assert killed.returncode == -9
    [tmp, *names] = sorted(p.name for p in out.parent.iterdir())  # the hidden temporary sorts first
    assert names == ["f-00001-of-00005.safetensors", "f-00002-of-00005.safetensors"]
    assert tmp.startswith(".f-00003-of-00005.safetensors.") and tmp.endswith(".tmp")
    assert main([*args, "--shard-size", "1"]) == 0
    assert "in 5 shards (2 kept from before)" in capsys.readouterr().out
    assert sorted(p.name for p in out.parent.iterdir()) == [
        *(f"f-0000{i}-of-00005.safetensors" for i in range(1, 6)),
        "f.safetensors.index.json",
    ]
    whole = tmp_path / "whole.safetensors"
    assert main([*args[:-1], str(whole)]) == 0
    reference = load_file(whole)
    shards = [load_file(out.parent / f"f-0000{i}-of-00005.safetensors") for i in range(1, 6)]
    for key in ("pooled", "patch_tokens", "grid_hw"):
        torch.testing.assert_close(torch.cat([s[key] for s in shards]), reference[key], rtol=1e-5, atol=1e-5)
