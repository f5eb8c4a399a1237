"""Data of the wrong MoCa kind is refused in one line (docs/method.md §3 "Data", "Pair data",
"Evaluation"): stage ``cl`` pointed at documents and stage ``cpt`` pointed at pairs, when the loader
is built (not after hundreds of bad samples); ``cmpt eval embed`` pointed at training pairs. Mixed
data still goes the bad-sample way, and ``cmpt eval embed`` takes a single task too."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cmpt.cli import main as cli_main
from cmpt.embed.embedder import Embedder
from cmpt.eval.embed import embed_main
from cmpt.eval.embed_data import load_embed_data
from cmpt.recipes import load_recipe
from vlm_fixtures import build_dirs, build_vlm


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("moca_kind")
    build_vlm(build_dirs(root / "models"), "qwen2").save_pretrained(root / "vlm")
    for kind, n, out in (("moca", 16, "moca"), ("retrieval", 48, "retrieval")):
        assert cli_main(["data", "synth", "--kind", kind, "--n", str(n), "--out", str(root / out)]) == 0
    return {"root": root, "vlm": root / "vlm", "moca": root / "moca", "retrieval": root / "retrieval"}


def _sets(setup, run_dir: Path, data: Path) -> list[str]:
    items = {
        "run.dir": run_dir,
        "model.init": setup["vlm"],
        "data.path": data,
        "stage.resolution.min_pixels": 28 * 28,
        "stage.resolution.max_pixels": 112 * 112,
        "train.steps": 2,
        "train.progress": False,
        "train.tensorboard": False,
    }
    return [f"{k}={v}" for k, v in items.items()]


WRONG_KIND = [
    ("tiny/moca_cl", "moca/train.yaml", "holds MoCa documents", "--kind retrieval`) or use stage cpt"),
    ("tiny/moca_cpt", "retrieval/train.jsonl", "holds contrastive pairs", "--kind moca`) or use stage cl"),
]


@pytest.mark.parametrize(("recipe", "data", "held", "fix"), WRONG_KIND)
def test_wrong_kind_is_one_line_at_loader_build(setup, tmp_path, capsys, recipe, data, held, fix):
    path = setup["root"] / data
    argv = ["train", recipe]
    for s in _sets(setup, tmp_path / "run", path):
        argv += ["--set", s]
    assert cli_main(argv) == 2
    err = capsys.readouterr().err
    assert f"data.path={path} {held}" in err and fix in err, err
    assert "Traceback" not in err and "too many bad samples" not in err
    assert not list((tmp_path / "run").glob("checkpoints/*/"))  # nothing trained


def test_mixed_data_still_goes_the_bad_sample_path(setup, tmp_path):
    """Pairs and documents in one file: no refusal up front; the loaders build and read it."""
    ret = setup["retrieval"]
    pairs = (ret / "train.jsonl").read_text().splitlines()
    docs = (setup["moca"] / "passages" / "train.jsonl").read_text().splitlines()
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text("\n".join([docs[0], *pairs[:40], *docs[1:4]]) + "\n")
    for recipe in ("tiny/moca_cl", "tiny/moca_cpt"):
        sets = [*_sets(setup, tmp_path / recipe, mixed), "stage.batch_size=2", f"data.image_root={ret}"]
        cfg, task_cls = load_recipe(recipe, sets)
        loader = task_cls(cfg).build_loader(0, 1)
        batch = next(iter(loader))
        assert batch["num_samples"] + batch["num_bad"] > 0


def test_eval_on_training_pairs_names_the_eval_folder(setup, capsys):
    ret = setup["retrieval"]
    for data in (ret, ret / "train.jsonl"):
        with pytest.raises(ValueError, match=r"looks like training data.*contrastive pairs.*stage cl"):
            load_embed_data(data, skip_bad=True)  # refused, not skipped record by record
        assert cli_main(["eval", "embed", "--model", "unused", "--data", str(data)]) == 2
        err = capsys.readouterr().err
        assert f"pass the evaluation folder (e.g. {ret / 'eval'})" in err and "qry_text/qry_img_path" in err
        assert "missing_key" not in err and "Traceback" not in err


def test_a_single_task_file_or_page_folder_is_a_one_task_evaluation(setup, tmp_path):
    ev = setup["retrieval"] / "eval"
    whole = load_embed_data(ev, limit=2)
    one = load_embed_data(ev / "caption2image.jsonl", limit=2)
    assert [t.name for t in one.mmeb] == ["caption2image"] and not one.pages
    assert one.root == ev  # image paths stay relative to the task's folder
    full = next(t for t in whole.mmeb if t.name == "caption2image")
    assert len(one.mmeb[0].queries) == len(full.queries) == 2
    assert [one.keys[i] for i in one.mmeb[0].queries] == [whole.keys[i] for i in full.queries]
    pages = load_embed_data(ev / "page_retrieval", limit=2)
    assert [t.name for t in pages.pages] == ["page_retrieval"] and not pages.mmeb
    emb = Embedder.from_pretrained(setup["vlm"], device="cpu")
    res = embed_main(emb, ev / "caption2image.jsonl", out=tmp_path / "out", limit=2)
    assert list(res["mmeb"]) == ["caption2image"] and res["data"] == str(ev / "caption2image.jsonl")
    saved = json.loads((tmp_path / "out" / "embed_results.json").read_text())
    assert saved["mmeb"]["caption2image"]["n_queries"] == 2
    (tmp_path / "x.txt").write_text("no")
    with pytest.raises(ValueError, match=r"one \*\.jsonl MMEB task file"):
        load_embed_data(tmp_path / "x.txt")


def test_a_moca_recipe_on_generic_optim_defaults_is_warned(tmp_path, caplog):
    """A MoCa YAML written without ``optim`` (and without ``base:`` on a shipped recipe) trains on
    cmpt's generic defaults: warned, naming the release's values; the shipped recipes are not."""
    import logging

    from cmpt.recipes import load_recipe
    from cmpt.recipes.moca import warn_generic_optim

    bare = tmp_path / "bare.yaml"
    bare.write_text("recipe: moca\nstage: {name: cl}\n")
    with caplog.at_level(logging.WARNING, logger="cmpt.recipes.moca"):
        warn_generic_optim(load_recipe(str(bare))[0])
        assert "not MoCa's (stage cl: lr 2e-5, warmup 5 %" in caplog.text
        caplog.clear()
        for name in ("moca/qwen2.5-vl-3b/cpt", "moca/qwen2.5-vl-3b/cl", "tiny/moca_cpt", "tiny/moca_cl"):
            warn_generic_optim(load_recipe(name)[0])
        assert caplog.text == ""
