"""Every data layout of docs/data.md trains: a 2-step tiny CoMP stage I on each (chat layout in JSON,
JSONL, HF disk, HF parquet, tar; LLaVA records in tar; caption shards; a mixture of tar shards, JSON
and a hub split; a hub split; a hub configuration root), and 2 MoCa CPT steps on caption shards
(read as documents)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cmpt.demo.synthetic import generate
from cmpt.recipes import run_recipe
from comp_fixtures import make_tiny_setup, overrides
from layout_fixtures import KINDS, N, write_layout

pytestmark = pytest.mark.slow
pytest.importorskip("datasets")


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("layouts_train")
    generate("scenes", N, root / "data", seed=0, split="train")
    return {**make_tiny_setup(root / "tiny", n=8), "root": root / "data"}


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("CMPT_CACHE", str(tmp_path / "cache"))


def _steps(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("kind", KINDS)
def test_two_comp_steps(kind, setup, tmp_path):
    path, _ = write_layout(kind, setup["root"], broken=False)
    extra = {"data.path": path, "train.log_every": 1, "data.caption_prompt": "'Caption this image:'"}
    summary = run_recipe("tiny/comp_stage1", overrides(setup, tmp_path / "run", steps=2, **extra))
    assert summary["step"] == 2 and (tmp_path / "run" / "final" / "vlm_config.json").is_file()
    rows = _steps(tmp_path / "run")
    assert len(rows) == 2 and all(r["loss"] == r["loss"] and r["loss"] > 0 for r in rows)


def test_two_moca_steps_on_caption_shards(setup, tmp_path):
    from vlm_fixtures import build_dirs, build_vlm

    build_vlm(build_dirs(tmp_path / "models"), "qwen2").save_pretrained(tmp_path / "vlm")
    path, _ = write_layout("caption_tar", setup["root"], broken=False)
    items = {
        "run.dir": tmp_path / "run",
        "model.init": tmp_path / "vlm",
        "data.path": path,
        "data.vision_budget": 96,
        "data.text_budget": 768,
        "data.max_text_tokens": 384,
        "stage.resolution.min_pixels": 28 * 28,
        "stage.resolution.max_pixels": 112 * 112,
        "train.steps": 2,
        "train.log_every": 1,
        "train.progress": False,
        "train.tensorboard": False,
    }
    summary = run_recipe("tiny/moca_cpt", [f"{k}={v}" for k, v in items.items()])
    assert summary["step"] == 2 and len(_steps(tmp_path / "run")) == 2
