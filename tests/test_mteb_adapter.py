"""cmpt Embedder through mteb's encoder protocol (docs/method.md §3 "Evaluation").

Runs ``mteb.evaluate`` offline on tiny image–text retrieval tasks whose data are generated here
(no hub access), on a tiny random Embedder. Skipped when the optional ``mteb`` extra is absent.
"""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch
from PIL import Image

try:
    import mteb
except ImportError as e:  # the optional extra (`pip install 'cmpt[mteb]'`)
    pytest.skip(f"mteb is not importable ({e}): pip install 'cmpt[mteb]'", allow_module_level=True)

from datasets import Dataset
from mteb.abstasks.retrieval import AbsTaskRetrieval
from mteb.abstasks.retrieval_dataset_loaders import RetrievalSplitData
from mteb.abstasks.task_metadata import TaskMetadata
from mteb.models.models_protocols import EncoderProtocol
from mteb.types import PromptType

from cmpt.embed.embedder import Embedder
from cmpt.embed.mteb_model import DOCUMENT_PROMPT, CmptMtebEncoder
from cmpt.eval.embed_metrics import ndcg_at_k_qrels
from vlm_fixtures import build_dirs, build_vlm

CAPTIONS = ["a red square", "two blue dots", "a green line chart", "an empty page"]


def _images(seed: int = 0) -> list[Image.Image]:
    rng = random.Random(seed)
    out = []
    for _ in CAPTIONS:
        img = Image.new("RGB", (56, 42), tuple(rng.randrange(256) for _ in range(3)))
        for _ in range(30):
            img.putpixel((rng.randrange(56), rng.randrange(42)), (255, 255, 255))
        out.append(img)
    return out


def _metadata(name: str, category: str) -> TaskMetadata:
    return TaskMetadata(
        name=name,
        description="A tiny local image-text retrieval task built by the cmpt tests.",
        reference="https://example.org/cmpt",
        dataset={"path": "local/none", "revision": "local"},
        type="Any2AnyRetrieval",
        category=category,
        modalities=["image", "text"],
        eval_splits=["test"],
        eval_langs=["eng-Latn"],
        main_score="ndcg_at_5",
        date=("2025-01-01", "2025-01-02"),
        domains=[],
        task_subtypes=[],
        license="cc-by-4.0",
        annotations_creators="derived",
        dialect=[],
        sample_creation="created",
        bibtex_citation="",
    )


def _qrels() -> dict[str, dict[str, int]]:
    return {f"q{i}": {f"d{i}": 1} for i in range(len(CAPTIONS))}


class LocalT2I(AbsTaskRetrieval):
    """Text queries → page images (no hub: ``load_data`` builds the split in memory)."""

    metadata = _metadata("CmptLocalT2I", "t2i")

    def load_data(self, num_proc: int | None = None, **kwargs) -> None:
        split = RetrievalSplitData(
            queries=Dataset.from_dict({"id": [f"q{i}" for i in range(4)], "text": CAPTIONS}),
            corpus=Dataset.from_dict({"id": [f"d{i}" for i in range(4)], "image": _images()}),
            relevant_docs=_qrels(),
            top_ranked=None,
        )
        self.dataset = {"default": {"test": split}}
        self.data_loaded = True


class LocalIT2T(AbsTaskRetrieval):
    """Image + question queries → text documents."""

    metadata = _metadata("CmptLocalIT2T", "it2t")

    def load_data(self, num_proc: int | None = None, **kwargs) -> None:
        split = RetrievalSplitData(
            queries=Dataset.from_dict(
                {
                    "id": [f"q{i}" for i in range(4)],
                    "text": ["what is shown?"] * 4,
                    "image": _images(1),
                }
            ),
            corpus=Dataset.from_dict({"id": [f"d{i}" for i in range(4)], "text": CAPTIONS}),
            relevant_docs=_qrels(),
            top_ranked=None,
        )
        self.dataset = {"default": {"test": split}}
        self.data_loaded = True


@pytest.fixture(scope="module")
def emb(tmp_path_factory):
    return Embedder(build_vlm(build_dirs(tmp_path_factory.mktemp("mteb")), "qwen2"), batch_tokens=128)


def test_adapter_follows_the_protocol(emb):
    model = CmptMtebEncoder(emb)
    assert isinstance(model, EncoderProtocol)
    meta = model.mteb_model_meta
    assert meta.similarity_fn_name == mteb.models.model_meta.ScoringFunction.COSINE
    assert set(meta.modalities) == {"image", "text"} and meta.embed_dim == emb.backbone.llm.config.hidden_size
    assert model.render(None, 1) == DOCUMENT_PROMPT
    assert model.render("q?", 2).startswith("<image>\n<image>\nRepresent the given image")
    assert model.render("plain", 0) == "plain"
    with pytest.raises(ValueError, match="placeholder"):
        CmptMtebEncoder(emb, image_prompt="no placeholder")


def test_adapter_loads_a_directory(emb, tmp_path):
    emb.save_pretrained(tmp_path / "tiny-embedder")
    model = CmptMtebEncoder(str(tmp_path / "tiny-embedder"), device="cpu")
    assert model.mteb_model_meta.name == "cmpt/tiny-embedder"
    assert model.mteb_model_meta.loader_kwargs == {"path": str(tmp_path / "tiny-embedder")}
    torch.testing.assert_close(model.embedder.encode(CAPTIONS), emb.encode(CAPTIONS), rtol=0, atol=0)


def test_encode_equals_the_embedder(emb):
    from torch.utils.data import DataLoader

    images = _images()
    rows = [{"text": c, "image": im} for c, im in zip(CAPTIONS, images)]
    loader = DataLoader(rows, batch_size=3, collate_fn=lambda b: {k: [r[k] for r in b] for k in b[0]})
    task = LocalIT2T()
    out = CmptMtebEncoder(emb).encode(
        loader,
        task_metadata=task.metadata,
        hf_split="test",
        hf_subset="default",
        prompt_type=PromptType.query,
    )
    assert isinstance(out, np.ndarray) and out.shape == (4, emb.backbone.llm.config.hidden_size)
    expected = emb.encode(
        [f"<image>\nRepresent the given image with the following question: {c}" for c in CAPTIONS], images
    )
    np.testing.assert_allclose(out, expected.numpy(), rtol=1e-5, atol=1e-6)


def test_mteb_evaluate_runs_offline(emb, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = CmptMtebEncoder(emb, name="cmpt/tiny-random")
    result = mteb.evaluate(
        model,
        [LocalT2I(), LocalIT2T()],
        cache=None,
        show_progress_bar=False,
        encode_kwargs={"batch_size": 2},
    )
    assert not result.exceptions
    by_name = {r.task_name: r for r in result.task_results}
    assert set(by_name) == {"CmptLocalT2I", "CmptLocalIT2T"}
    for r in by_name.values():
        scores = r.scores["test"][0]
        for key in ("main_score", "ndcg_at_5", "recall_at_1", "map_at_5"):
            assert math.isfinite(scores[key]) and 0.0 <= scores[key] <= 1.0, (r.task_name, key)
    # the same numbers as cmpt's own scorer on the Embedder's vectors (raw text queries, pages
    # with the document prompt, cosine = dot of unit vectors, linear-gain nDCG@5)
    q, d = emb.encode(CAPTIONS), emb.encode([DOCUMENT_PROMPT] * 4, _images())
    expected = ndcg_at_k_qrels(q @ d.T, [{i: 1} for i in range(4)], k=5)
    assert by_name["CmptLocalT2I"].scores["test"][0]["ndcg_at_5"] == pytest.approx(expected, abs=1e-5)
