"""Inputs that cmpt's loaders and encoders take in every form they document (docs/method.md §1.5,
§3, §5): one image given to ``Embedder.encode``; hub ids of cmpt directories and of Hugging Face
checkpoints in ``cmpt encode``, ``cmpt eval`` and the mteb adapter (a fake offline Hugging Face
cache, as ``hf download`` leaves it); towers and VLMs of the CoMP release; paths that do not exist
(named as such, first); download hints of the installed ``huggingface_hub``; a model card's
``base_model`` that does not depend on the current directory."""

from __future__ import annotations

import io
import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from huggingface_hub import constants
from PIL import Image
from safetensors.torch import load_file

import cmpt
import hf_tiny
from cmpt.cli import main
from cmpt.demo.tiny_lm import default_corpus, train_tokenizer
from cmpt.embed.backbones import backbone_kind
from cmpt.embed.embedder import Embedder
from cmpt.eval.features import load_vision
from cmpt.hub import hub_cli
from cmpt.vision.convert import comp_tower_overrides, image_stats
from cmpt.vlm.chat import ensure_vision_tokens
from cmpt.vlm.official_release import load_official_vlm
from release_fixtures import tower_config, write_vfm, write_vlm
from vlm_fixtures import build_dirs, build_vlm

pytestmark = pytest.mark.usefixtures("one_thread")

SHA = "0" * 40
STATS = {"image_mean": [0.1, 0.2, 0.3], "image_std": [0.3, 0.2, 0.1]}  # no family's defaults


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """Local directories: a NativeViT, a cmpt VLM, an HF DINOv2 (own mean/std), a CoMP-VFM tower and a
    CoMP-MM VLM of the release, an image; and the same under ``acme/*`` in a fake HF cache."""
    root = tmp_path_factory.mktemp("interop")
    dirs = build_dirs(root / "dirs")
    build_vlm(dirs).save_pretrained(root / "vlm")
    dinov2 = hf_tiny.save("dinov2", root / "hf")
    pre = json.loads((dinov2 / "preprocessor_config.json").read_text())
    (dinov2 / "preprocessor_config.json").write_text(json.dumps({**pre, **STATS}))
    vfm = write_vfm(root / "release", "dinov2")
    tok = train_tokenizer(default_corpus(300), vocab_size=400)
    ensure_vision_tokens(tok)
    tower = root / "release" / "tower"
    tower.mkdir()
    (tower / "config.json").write_text(json.dumps(tower_config("dinov2")))
    comp_mm, _ = write_vlm(root / "release", "dinov2", tok, tied=True, tower_ref=str(tower))
    noconfig = root / "noconfig"
    noconfig.mkdir()
    (noconfig / "model.safetensors").write_bytes((dinov2 / "model.safetensors").read_bytes())
    img = root / "img.png"
    g = torch.Generator().manual_seed(0)
    Image.fromarray((torch.rand(70, 98, 3, generator=g) * 255).to(torch.uint8).numpy()).save(img)
    out = dict(root=root, dirs=dirs, vit=dirs / "vit", vlm=root / "vlm", dinov2=dinov2, vfm=vfm)
    out.update(comp_mm=comp_mm, img=img, cache=root / "hf-home" / "hub")
    repos = {"vit": "vit", "vlm": "vlm", "dinov2": "dinov2", "vfm": "vfm", "noconfig": noconfig}
    for name, src in repos.items():  # the layout `hf download` leaves (files instead of blob links)
        repo = out["cache"] / f"models--acme--{name}"
        shutil.copytree(out[src] if isinstance(src, str) else src, repo / "snapshots" / SHA)
        (repo / "refs").mkdir()
        (repo / "refs" / "main").write_text(SHA)
    return out


@pytest.fixture
def hub(models, monkeypatch) -> Path:
    """The fake cache of ``models`` as HF_HOME, offline (huggingface_hub reads both at import)."""
    monkeypatch.setenv("HF_HOME", str(models["cache"].parent))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(models["cache"]))
    return models["cache"]


@pytest.fixture(scope="module")
def emb(models) -> Embedder:
    return Embedder(build_vlm(models["dirs"]), batch_tokens=256)


def _same_model(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def _error_line(capsys: pytest.CaptureFixture, argv: list[str]) -> str:
    assert main(argv) == 2
    [line] = [x for x in capsys.readouterr().err.splitlines() if x.startswith("cmpt ")]
    return line


# ----------------------------------------------------------------------------- 1. one image, one input
def test_one_image_is_one_input(emb, models):
    path = models["img"]
    pil = Image.open(path).convert("RGB")
    ref = emb.encode(images=[path])  # a list of one image: one input
    assert ref.shape == (1, emb.backbone.llm.config.hidden_size)
    for one in (str(path), path, path.read_bytes(), pil):
        torch.testing.assert_close(emb.encode(images=one), ref, rtol=0, atol=1e-6)
    with_text = emb.encode("a caption", images=str(path))
    assert with_text.shape == ref.shape
    torch.testing.assert_close(with_text, emb.encode(["a caption"], [path]), rtol=0, atol=1e-6)
    both = emb.encode(["a red square", "a caption"], images=pil)  # one image for every text
    torch.testing.assert_close(both, emb.encode(["a red square", "a caption"], [pil, pil]), rtol=0, atol=1e-6)
    buf = io.BytesIO()
    pil.save(buf, format="PNG")
    assert emb.encode(images=buf.getvalue(), instructions="Represent the image.").shape == ref.shape


# ----------------------------------------------------------------------------- 2. hub ids of cmpt dirs
def test_cmpt_encode_takes_a_hub_id(hub, models, tmp_path):
    for name, model in (("hub", "acme/vit"), ("local", str(models["vit"]))):
        argv = ["encode", "--model", model, str(models["img"]), "--out", str(tmp_path / f"{name}.st")]
        assert main([*argv, "--quiet"]) == 0
    ours, ref = load_file(tmp_path / "hub.st"), load_file(tmp_path / "local.st")
    assert ours.keys() == ref.keys() and all(torch.equal(ours[k], ref[k]) for k in ref)


@pytest.mark.parametrize("name", ["vlm", "vit", "dinov2", "vfm"])
def test_eval_models_by_hub_id(hub, models, name):
    vit, proc = load_vision(f"acme/{name}")
    ref_vit, ref_proc = load_vision(models[name])
    _same_model(vit, ref_vit)
    assert vit.config == ref_vit.config and proc.to_dict() == ref_proc.to_dict()


def test_mteb_adapter_takes_a_hub_id(hub, models):
    pytest.importorskip("mteb", reason="the optional extra: pip install 'cmpt[mteb]'")
    from cmpt.embed import mteb_model

    enc = mteb_model.CmptMtebEncoder("acme/vlm", device="cpu")
    assert enc.mteb_model_meta.name == "cmpt/vlm" and enc.mteb_model_meta.loader_kwargs == {
        "path": "acme/vlm"
    }
    ref = Embedder.from_pretrained(models["vlm"])
    torch.testing.assert_close(enc.embedder.encode("a red square"), ref.encode("a red square"))


# ----------------------------------------------------------------------------- 3. the CoMP release
def test_release_towers_and_vlms_encode_and_evaluate(models, tmp_path):
    out = tmp_path / "f.safetensors"
    assert (
        main(["encode", "--model", str(models["vfm"]), str(models["img"]), "--out", str(out), "--quiet"]) == 0
    )
    vit, proc = load_vision(models["vfm"])
    assert vit.config.source == "comp-release:dinov2" and vit.config.pos_embed_order == "official"
    _same_model(vit, cmpt.NativeViT.from_pretrained(models["vfm"]))
    assert proc.policy == "native" and list(proc.std) == [0.229, 0.224, 0.225]
    feats = load_file(out)
    x, grid = proc.preprocess(models["img"])
    with torch.no_grad():
        tokens, prefix = vit.eval().encode(x, [grid])
        torch.testing.assert_close(feats["pooled"], vit.pool(tokens, prefix, [grid]), rtol=1e-5, atol=1e-5)
    vit, proc = load_vision(models["comp_mm"])  # a CoMP-MM: its tower and processor
    ref = load_official_vlm(models["comp_mm"])
    _same_model(vit, ref.vit)
    assert proc.to_dict() == ref.processor.to_dict()


# ----------------------------------------------------------------------------- 4. processors by hub id
def test_image_processor_and_stats_of_a_hub_id(hub, models):
    ours = cmpt.ImageProcessor.from_hf("acme/dinov2", policy="native")
    assert ours.to_dict() == cmpt.ImageProcessor.from_hf(models["dinov2"], policy="native").to_dict()
    assert list(ours.mean) == STATS["image_mean"]
    want = {k: tuple(v) for k, v in STATS.items()}
    assert image_stats("acme/dinov2") == image_stats(models["dinov2"]) == want
    assert cmpt.NativeViT.from_hf("acme/dinov2").config.image_mean == want["image_mean"]


# ----------------------------------------------------------------------------- 5. missing paths
def test_missing_paths_are_named_before_their_kind(models, tmp_path, capsys):
    nope = str(tmp_path / "nope")
    line = _error_line(capsys, ["convert", "official", nope, str(tmp_path / "out")])
    assert f"CoMP release checkpoint {nope} does not exist: check the path" in line
    line = _error_line(capsys, ["encode", "--model", nope, str(models["img"]), "--out", str(tmp_path / "f")])
    assert f"vision checkpoint {nope} does not exist" in line
    for load, what in (
        (cmpt.NativeViT.from_pretrained, "NativeViT"),
        (cmpt.VisionLanguageModel.from_pretrained, "cmpt VLM"),
        (Embedder.from_pretrained, "Embedder"),
        (backbone_kind, "backbone"),
        (load_vision, "vision checkpoint"),
        (cmpt.ImageProcessor.from_hf, "image processor"),
    ):
        for name in (nope, Path(nope)):
            with pytest.raises(
                FileNotFoundError,
                match=rf"^{what} {nope} does not exist: (check the path|pass the directory)",
            ):
                load(name)


# ----------------------------------------------------------------------------- 6. download hints
def test_hints_name_the_installed_cli(hub, models, tmp_path):
    stale = "huggingface-cli" if hub_cli() == "hf" else "`hf download"
    with pytest.raises(FileNotFoundError, match=r"acme/noconfig has no config\.json") as err:
        comp_tower_overrides("acme/noconfig")  # a cached repo without config.json
    assert stale not in str(err.value)
    noconfig = models["root"] / "noconfig"  # a NativeViT directory has its preprocessor_config.json
    with pytest.raises(
        FileNotFoundError, match=rf"no preprocessor_config.json in '{re.escape(str(noconfig))}'"
    ) as err:
        cmpt.ImageProcessor.from_hf(noconfig)
    assert stale not in str(err.value)


# ----------------------------------------------------------------------------- 7. base_model of a card
def _base_model(directory: Path) -> list[str] | None:
    import yaml

    text = (directory / "README.md").read_text()
    return yaml.safe_load(text[4:].split("\n---\n", 1)[0]).get("base_model")


def test_card_base_model_does_not_depend_on_the_current_directory(models, tmp_path, monkeypatch):
    project = tmp_path / "project"
    shutil.copytree(models["dirs"], project / "dirs")
    monkeypatch.chdir(project)
    vlm = build_vlm(Path("dirs"))  # recorded as the relative paths "dirs/vit", "dirs/qwen2"
    assert (vlm.config.vision, vlm.config.llm) == ("dirs/vit", "dirs/qwen2")
    vlm.save_pretrained(project / "vlm")
    assert _base_model(project / "vlm") is None
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # "dirs/vit" now has the form of a hub id and no local path
    again = cmpt.VisionLanguageModel.from_pretrained(project / "vlm")
    again.save_pretrained(elsewhere / "vlm")
    assert _base_model(elsewhere / "vlm") is None
    again.export_vit(elsewhere / "vit")
    Embedder(again).save_pretrained(elsewhere / "emb")
    assert _base_model(elsewhere / "vit") is None and _base_model(elsewhere / "emb") is None
    again.config.vision = "google/siglip-base-patch16-224"  # a hub id is still one
    again.save_pretrained(elsewhere / "hub")
    assert _base_model(elsewhere / "hub") == ["google/siglip-base-patch16-224"]
