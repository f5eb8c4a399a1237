"""``cmpt encode --shard-size N`` (docs/method.md §7 "Sharded, resumable encoding"): shards hold
the same features as one file, a rerun keeps finished shards and encodes the rest (after a crash
or a bad image), and shards made from other images, settings or weights stop the run with the
shard named, before any work."""

from __future__ import annotations

import json
import os

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import cmpt.encode_shards as es
import hf_tiny
from cmpt.cli import main
from cmpt.encode import encode_images, load_vit, processor_for


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("shards")
    ckpt = hf_tiny.save("dinov2", root)
    g = torch.Generator().manual_seed(1)
    folder = root / "imgs"
    folder.mkdir()
    for i, (w, h) in enumerate([(120, 80), (64, 200), (150, 150), (90, 40), (70, 70)]):
        Image.fromarray((torch.rand(h, w, 3, generator=g) * 255).to(torch.uint8).numpy()).save(
            folder / f"{i}.png"
        )
    vit = load_vit(ckpt).eval()
    return ckpt, vit, processor_for(vit, ckpt), sorted(folder.glob("*.png"))


def _concat(files: list[str]) -> dict[str, torch.Tensor]:
    parts = [load_file(f) for f in files]
    out = {k: torch.cat([p[k] for p in parts]) for k in ("pooled", "patch_tokens", "grid_hw")}
    counts = out["grid_hw"].prod(1)
    out["offsets"] = torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)])
    return out


def test_shards_hold_the_features_of_one_file(setup, tmp_path):
    _, vit, proc, images = setup
    whole = encode_images(vit, proc, images, tmp_path / "one.safetensors", progress=False, token_budget=60)
    res = es.encode_sharded(vit, proc, images, tmp_path / "f.safetensors", shard_size=2, progress=False)
    names = [f"f-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    assert [os.path.basename(p) for p in res.shards] == names and res.reused == 0
    assert not (tmp_path / "f.safetensors").exists()
    index = json.loads((tmp_path / "f.safetensors.index.json").read_text())
    assert res.out == str(tmp_path / "f.safetensors.index.json")
    assert [s["file"] for s in index["shards"]] == names and [s["images"] for s in index["shards"]] == [
        2,
        2,
        1,
    ]
    assert index["images"] == 5 and res.images == whole.images and res.num_patches == whole.num_patches
    assert sum(s["patches"] for s in index["shards"]) == whole.num_patches
    one, sharded = load_file(tmp_path / "one.safetensors"), _concat(res.shards)
    for key in ("pooled", "patch_tokens", "grid_hw", "offsets"):
        torch.testing.assert_close(sharded[key], one[key], rtol=1e-5, atol=1e-5)


def test_a_rerun_keeps_finished_shards_and_encodes_the_rest(setup, tmp_path, monkeypatch):
    _, vit, proc, images = setup
    out = tmp_path / "f.safetensors"
    first = es.encode_sharded(vit, proc, images, out, shard_size=2, progress=False)
    reference = {p: load_file(p) for p in first.shards}
    os.remove(first.shards[1])  # a crash during the second shard: no file (written atomically), no index
    os.remove(first.out)
    stamp = os.stat(first.shards[0]).st_mtime_ns
    encoded = []
    real = es.encode_images

    def spy(vit, processor, chunk, path, **kwargs):
        encoded.append(os.path.basename(path))
        return real(vit, processor, chunk, path, **kwargs)

    monkeypatch.setattr(es, "encode_images", spy)
    again = es.encode_sharded(vit, proc, images, out, shard_size=2, progress=False)
    assert encoded == ["f-00002-of-00003.safetensors"] and again.reused == 2
    assert os.stat(first.shards[0]).st_mtime_ns == stamp
    assert again.images == first.images and again.num_patches == first.num_patches
    for p in again.shards:
        for k, v in load_file(p).items():
            torch.testing.assert_close(v, reference[p][k], rtol=0, atol=0)
    assert json.loads(es.index_path(out).read_text())["images"] == 5  # the index is written again
    encoded.clear()
    assert es.encode_sharded(vit, proc, images, out, shard_size=2, progress=False).reused == 3 and not encoded


def test_a_bad_image_stops_at_its_shard_and_the_fixed_rerun_resumes(setup, tmp_path):
    _, vit, proc, images = setup
    folder = tmp_path / "imgs"
    folder.mkdir()
    paths = []
    for p in images:
        paths.append(folder / p.name)
        paths[-1].write_bytes(p.read_bytes())
    paths[3].write_bytes(b"not an image")
    out = tmp_path / "f.safetensors"
    with pytest.raises(ValueError, match=r"3\.png"):
        es.encode_sharded(vit, proc, paths, out, shard_size=2, progress=False)
    assert (tmp_path / "f-00001-of-00003.safetensors").exists()
    assert not (tmp_path / "f-00002-of-00003.safetensors").exists() and not es.index_path(out).exists()
    skipped = es.encode_sharded(vit, proc, paths, out, shard_size=2, progress=False, skip_bad=True)
    assert skipped.reused == 1 and list(skipped.skipped) == [str(paths[3])] and len(skipped.images) == 4
    again = es.encode_sharded(vit, proc, paths, out, shard_size=2, progress=False)
    assert again.reused == 3 and list(again.skipped) == [str(paths[3])]  # reported again, kept


def test_a_shard_of_only_bad_images_is_skipped_with_skip_bad(setup, tmp_path):
    _, vit, proc, images = setup
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    paths = [images[0], bad, images[1]]
    out = tmp_path / "f.safetensors"
    with pytest.raises(ValueError, match=r"bad\.png"):
        es.encode_sharded(vit, proc, paths, out, shard_size=1, progress=False)
    for expected_reused in (1, 2):  # shard 1 was written before the error; the empty one has no file
        res = es.encode_sharded(vit, proc, paths, out, shard_size=1, progress=False, skip_bad=True)
        assert list(res.skipped) == [str(bad)] and len(res.images) == 2 and res.reused == expected_reused
    index = json.loads(es.index_path(out).read_text())
    assert [s["file"] for s in index["shards"]] == [
        "f-00001-of-00003.safetensors",
        "f-00003-of-00003.safetensors",
    ]
    with pytest.raises(es.NothingEncodedError, match="no image could be encoded"):
        es.encode_sharded(
            vit, proc, [bad], tmp_path / "g.safetensors", shard_size=1, skip_bad=True, progress=False
        )


def test_shards_of_other_images_settings_or_weights_stop_the_run(setup, tmp_path):
    ckpt, vit, proc, images = setup
    out = tmp_path / "f.safetensors"
    es.encode_sharded(vit, proc, images, out, shard_size=2, progress=False)
    stamps = {p: p.stat().st_mtime_ns for p in tmp_path.glob("f-*")}
    reordered = [images[1], images[0], *images[2:]]
    with pytest.raises(ValueError, match=r"f-00001-of-00003.safetensors was encoded from other images"):
        es.encode_sharded(vit, proc, reordered, out, shard_size=2, progress=False)
    with pytest.raises(ValueError, match=r"other settings \(features\)"):
        es.encode_sharded(vit, proc, images, out, shard_size=2, patches=False, progress=False)
    small = processor_for(vit, ckpt, max_pixels=56 * 56)
    with pytest.raises(ValueError, match=r"other settings \(processor\.max_pixels\)"):
        es.encode_sharded(vit, small, images, out, shard_size=2, progress=False)
    other = load_vit(ckpt).eval()
    with torch.no_grad():
        next(other.parameters()).add_(1e-3)
    with pytest.raises(ValueError, match=r"other weights \(1 parameter"):
        es.encode_sharded(other, proc, images, out, shard_size=2, progress=False)
    with pytest.raises(ValueError, match="shards of another shard count"):
        es.encode_sharded(vit, proc, images, out, shard_size=3, progress=False)
    assert {p: p.stat().st_mtime_ns for p in tmp_path.glob("f-*")} == stamps  # nothing rewritten
    (tmp_path / "f-00001-of-00003.safetensors").unlink()  # missing shard 1, other settings in 2 and 3
    with pytest.raises(ValueError, match=r"f-00002-of-00003.safetensors was encoded from other settings"):
        es.encode_sharded(vit, proc, images, out, shard_size=2, patches=False, progress=False)
    assert not (tmp_path / "f-00001-of-00003.safetensors").exists()  # checked before any work


def test_foreign_files_are_refused_before_any_work(setup, tmp_path):
    _, vit, proc, images = setup
    out = tmp_path / "f.safetensors"
    (tmp_path / "f-00002-of-00003.safetensors").write_text("my notes")
    with pytest.raises(FileExistsError, match=r"f-00002-of-00003\.safetensors exists and is not a file cmpt"):
        es.encode_sharded(vit, proc, images, out, shard_size=2, progress=False)
    assert not (tmp_path / "f-00001-of-00003.safetensors").exists()
    os.remove(tmp_path / "f-00002-of-00003.safetensors")
    es.index_path(out).write_text('{"my": "data"}')
    with pytest.raises(FileExistsError, match=r"index\.json exists and is not an index"):
        es.encode_sharded(vit, proc, images, out, shard_size=2, progress=False)
    with pytest.raises(IsADirectoryError, match="is a directory"):
        es.encode_sharded(vit, proc, images, tmp_path, shard_size=2, progress=False)


def test_cli_shard_size(setup, tmp_path, capsys):
    ckpt, _, _, images = setup
    args = [
        "encode",
        "--model",
        str(ckpt),
        str(images[0].parent),
        "--quiet",
        "--out",
        str(tmp_path / "f.safetensors"),
    ]
    assert main([*args, "--shard-size", "2"]) == 0
    assert "in 3 shards (0 kept from before)" in capsys.readouterr().out
    assert main([*args, "--shard-size", "2"]) == 0
    assert "in 3 shards (3 kept from before)" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        main([*args, "--shard-size", "0"])
    assert e.value.code == 2 and "expected an integer >= 1" in capsys.readouterr().err
