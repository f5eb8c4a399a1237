"""`cmpt encode` and `cmpt demo --quick`: features on disk equal the model's, bad images are named."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

import hf_tiny
from cmpt.cli import main
from cmpt.encode import budget_batches, encode_images, load_vit, processor_for


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("enc")
    ckpt = hf_tiny.save("dinov2", root)
    g = torch.Generator().manual_seed(0)
    paths = []
    for i, (w, h) in enumerate([(120, 80), (64, 200), (150, 150), (90, 40)]):
        arr = (torch.rand(h, w, 3, generator=g) * 255).to(torch.uint8).numpy()
        p = root / "imgs" / f"im{i}.png"
        p.parent.mkdir(exist_ok=True)
        Image.fromarray(arr).save(p)
        paths.append(p)
    return ckpt, paths, root


def test_encode_cli_matches_model(setup, tmp_path):
    ckpt, paths, root = setup
    out = tmp_path / "f.safetensors"
    assert (
        main(
            [
                "encode",
                "--model",
                str(ckpt),
                str(root / "imgs"),
                "--out",
                str(out),
                "--token-budget",
                "40",
                "--quiet",
            ]
        )
        == 0
    )
    feats = load_file(out)
    with safe_open(out, "pt") as f:
        names = json.loads(f.metadata()["images"])
    assert [p.split("/")[-1] for p in names] == [p.name for p in paths]
    vit = load_vit(ckpt).eval()
    proc = processor_for(vit, ckpt)
    for i, path in enumerate(paths):
        img = proc.prepare(path)
        x = torch.from_numpy(__import__("numpy").asarray(img, dtype="float32")).permute(2, 0, 1) / 255
        x = (x - torch.tensor(proc.mean)[:, None, None]) / torch.tensor(proc.std)[:, None, None]
        with torch.no_grad():
            ref = vit.forward_images([x])[0]
        start, end = feats["offsets"][i].item(), feats["offsets"][i + 1].item()
        torch.testing.assert_close(feats["patch_tokens"][start:end], ref[1:], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(feats["pooled"][i], ref[0], atol=1e-4, rtol=1e-4)  # DINOv2 pools the CLS


def test_bf16_precision_saves_float32_close_to_fp32(setup, tmp_path):
    ckpt, _, root = setup
    outs = {}
    for prec in ("fp32", "bf16"):
        outs[prec] = tmp_path / f"{prec}.safetensors"
        args = ["encode", "--model", str(ckpt), str(root / "imgs"), "--out", str(outs[prec]), "--quiet"]
        assert main([*args, "--precision", prec]) == 0
    a, b = load_file(outs["fp32"]), load_file(outs["bf16"])
    for key in ("pooled", "patch_tokens"):
        assert b[key].dtype == torch.float32 and not torch.equal(a[key], b[key])  # autocast did run
        assert (a[key] - b[key]).norm() / a[key].norm() < 3e-2
    vit = load_vit(ckpt)
    with pytest.raises(ValueError, match="precision"):
        encode_images(vit, processor_for(vit, ckpt), [], tmp_path / "x", precision="fp8")


def test_bad_image_is_named_and_skippable(setup, tmp_path, capsys):
    ckpt, paths, _ = setup
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"<html>not an image</html>")
    args = [
        "encode",
        "--model",
        str(ckpt),
        str(paths[0]),
        str(bad),
        "--out",
        str(tmp_path / "f.safetensors"),
        "--quiet",
    ]
    assert main(args) == 2  # a one-line error naming the file, no traceback
    err = capsys.readouterr().err
    assert "cmpt encode: error:" in err and "broken.jpg" in err and "Traceback" not in err
    assert main([*args, "--skip-bad"]) == 0
    assert load_file(tmp_path / "f.safetensors")["grid_hw"].shape == (1, 2)
    assert (
        main(
            [
                "encode",
                "--model",
                str(ckpt),
                str(tmp_path / "missing.png"),
                "--out",
                str(tmp_path / "g.safetensors"),
            ]
        )
        == 2
    )
    assert "missing.png" in capsys.readouterr().err


def test_budget_batches():
    assert list(budget_batches([3, 3, 5, 20, 1], 6)) == [[0, 1], [2], [3], [4]]


def test_python_dash_m_help():
    res = subprocess.run([sys.executable, "-m", "cmpt", "--help"], capture_output=True, text=True, check=True)
    assert "encode" in res.stdout and "demo" in res.stdout


def test_encode_vlm_directory_uses_its_vision_tower(setup, tmp_path, capsys):
    from cmpt import NativeViT, NativeViTConfig, VisionLanguageModel
    from cmpt.demo.tiny_lm import build_tiny_causal_lm, default_corpus, train_tokenizer
    from cmpt.vision.processor import ImageProcessor

    _, _, root = setup
    tok = train_tokenizer(default_corpus(50), vocab_size=300)
    vit = NativeViT(
        NativeViTConfig(hidden_size=32, num_layers=1, num_heads=4, intermediate_size=64, pos_grid=4)
    )
    proc = ImageProcessor(14, 2, mean=(0.2, 0.3, 0.4), min_pixels=28 * 28, max_pixels=56 * 56)
    VisionLanguageModel.build(
        vit, build_tiny_causal_lm(tok, hidden_size=32), tok, processor=proc
    ).save_pretrained(tmp_path / "vlm")
    out = tmp_path / "vlm.safetensors"
    assert (
        main(["encode", "--model", str(tmp_path / "vlm"), str(root / "imgs"), "--out", str(out), "--quiet"])
        == 0
    )
    ref = tmp_path / "ref.safetensors"
    tower = NativeViT.from_pretrained(tmp_path / "vlm" / "vision")
    encode_images(
        tower, ImageProcessor.from_hf(tmp_path / "vlm" / "processor"), sorted((root / "imgs").iterdir()), ref
    )
    got, want = load_file(out), load_file(ref)
    assert got.keys() == want.keys()
    for key in got:
        torch.testing.assert_close(got[key], want[key])
    assert (got["grid_hw"].prod(1) * 14 * 14 <= 56 * 56).all()  # the VLM's processor/ (its cap) applies


@pytest.mark.parametrize("device", ["bogus", "cuda:99", "mps:0"])
def test_encode_refuses_an_unusable_device(setup, device, tmp_path, capsys):
    ckpt, paths, _ = setup
    args = ["encode", "--model", str(ckpt), str(paths[0]), "--out", str(tmp_path / "f.safetensors")]
    if device == "mps:0" and torch.backends.mps.is_available():
        pytest.skip("MPS is available here")
    assert main([*args, "--quiet", "--device", device]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and f"--device {device!r} is not available here" in err
    assert "use one of: auto, cpu" in err and not (tmp_path / "f.safetensors").exists()


def test_out_replaces_only_an_earlier_encode_output(setup, tmp_path, capsys):
    """README: outputs never replace a user's file. An existing ``--out`` is replaced only when its
    safetensors metadata marks it as ``cmpt encode``'s (or it has exactly encode's layout, older files)."""
    from safetensors.torch import save_file

    ckpt, paths, _ = setup
    args = ["encode", "--model", str(ckpt), str(paths[0]), "--quiet", "--out"]
    user_files = {
        "notes.safetensors": b"my precious notes",
        "weights.safetensors": None,  # another tool's safetensors file
    }
    for name, data in user_files.items():
        f = tmp_path / name
        if data is None:
            save_file({"w": torch.ones(2)}, str(f), metadata={"format": "pt"})
        else:
            f.write_bytes(data)
        before = f.read_bytes()
        assert main([*args, str(f)]) == 2
        err = capsys.readouterr().err
        assert f"output {f} exists and is not a file cmpt encode wrote: not replacing it" in err
        assert "choose another --out" in err and "Traceback" not in err
        assert f.read_bytes() == before and not f.with_name(f.name + ".tmp").exists()
    out = tmp_path / "f.safetensors"
    assert main([*args, str(out)]) == 0 and main([*args, str(out)]) == 0  # its own output: replaced
    from cmpt.encode import ENCODE_MARKER

    with safe_open(out, "pt") as f:
        assert ENCODE_MARKER in f.metadata()
    old = tmp_path / "old.safetensors"  # written before the mark: encode's tensors and image list
    save_file(
        {"grid_hw": torch.ones(1, 2, dtype=torch.long), "offsets": torch.zeros(2, dtype=torch.long)},
        str(old),
        metadata={"images": "[]", "model": "hf:dinov2"},
    )
    assert main([*args, str(old)]) == 0


def test_encode_names_the_model_passed_and_takes_pixel_products(setup, tmp_path, capsys):
    ckpt, paths, _ = setup
    out = tmp_path / "f.safetensors"
    args = ["encode", "--model", str(ckpt), str(paths[3]), "--quiet", "--out", str(out)]
    assert main([*args, "--min-pixels", "200*200"]) == 0
    line = capsys.readouterr().out
    assert f" with {ckpt} (from hf:dinov2) -> {out}" in line  # what the user passed, then its origin
    want = processor_for(load_vit(ckpt, weights=False), ckpt, min_pixels=40000).grid_size(40, 90)
    assert load_file(out)["grid_hw"].tolist() == [list(want)]  # the 90×40 image upscaled to >= 200²
    assert main([*args, "--min-pixels", "56x"]) == 2
    assert "--min-pixels '56x': pass one positive pixel count or product" in capsys.readouterr().err
    assert main([*args, "--min-pixels", "200*200", "--max-pixels", "112*112"]) == 2
    assert "--min-pixels 40000 exceeds --max-pixels 12544" in capsys.readouterr().err


def test_encode_help_explains_both_pixel_bounds():
    res = subprocess.run(
        [sys.executable, "-m", "cmpt", "encode", "--help"], capture_output=True, text=True, check=True
    )
    text = " ".join(res.stdout.split())
    assert "--min-pixels MIN_PIXELS pixel floor, a count or a product" in text
    assert "--max-pixels MAX_PIXELS pixel cap, a count or a product" in text


def test_progress_stays_short_of_100_percent_when_encoding_fails(setup, tmp_path, capsys):
    ckpt, paths, _ = setup
    vit = load_vit(ckpt)

    def broken(*args, **kwargs):
        raise RuntimeError("kernel failed")

    vit.encode = broken
    with pytest.raises(RuntimeError, match="kernel failed"):
        encode_images(vit, processor_for(vit, ckpt), paths[:1], tmp_path / "f.safetensors", progress=True)
    assert "100%" not in capsys.readouterr().err


def test_token_budget_must_be_positive(setup, tmp_path, capsys):
    ckpt, paths, _ = setup
    for bad in ("0", "-5", "many"):
        with pytest.raises(SystemExit):
            main(
                [
                    "encode",
                    "--model",
                    str(ckpt),
                    str(paths[0]),
                    "--out",
                    str(tmp_path / "f"),
                    "--token-budget",
                    bad,
                ]
            )
        assert f"--token-budget: expected an integer >= 1, got '{bad}'" in capsys.readouterr().err
    assert not (tmp_path / "f").exists()
