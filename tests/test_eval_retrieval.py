"""Image↔text retrieval from the alignment-loss feature spaces (docs/method.md §5)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

from cmpt.eval.retrieval import retrieval_eval, retrieval_main, retrieval_scores
from cmpt.vision.processor import ImageProcessor
from cmpt.vision.vit import NativeViT, NativeViTConfig

N = 12


class FakeTokenizer:
    """``"caption 7"`` → ids ``[7, 7]``."""

    pad_token_id, eos_token_id = 0, 0

    def __call__(self, text, add_special_tokens=False):
        k = int(text.split()[-1])
        return {"input_ids": [k, k]}


class FakeRetrievalModel:
    """Image ``k`` is a flat grey of level ``20·k + 10``; its merged tokens are ``emb[k]`` (plus
    noise) and caption ``k``'s feature is ``emb[perm[k]]``: with the identity the spaces coincide."""

    def __init__(self, perm: list[int] | None = None) -> None:
        gen = torch.Generator().manual_seed(0)
        self.emb = torch.randn(N, 16, generator=gen)
        self.perm = perm or list(range(N))
        self.processor = ImageProcessor(14, 2, mean=(0, 0, 0), std=(1, 1, 1), min_pixels=28 * 28)
        self.tokenizer = FakeTokenizer()
        self.config = SimpleNamespace(merge_size=2)
        self.training = False

    def encode_images(self, patches, grid_hw):
        windows = patches.reshape(patches.shape[0] // 4, -1)
        k = ((windows.mean(1) * 255 - 10) / 20).round().long()
        return self.emb[k] + 0.01 * torch.randn(len(k), 16)

    def text_features(self, ids, cu_seqlens):
        cu = torch.as_tensor(cu_seqlens)
        assert cu.diff().eq(2).all()  # packed captions of two tokens each
        return self.emb[torch.tensor([self.perm[int(ids[i])] for i in cu[:-1]])]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("retrieval")
    recs = []
    for k in range(N):
        Image.new("RGB", (56 + 28 * (k % 3), 56), (20 * k + 10,) * 3).save(root / f"{k}.png")
        conv = [{"from": "human", "value": "<image>\nDescribe."}, {"from": "gpt", "value": f"caption {k}"}]
        recs.append({"id": str(k), "image": f"{k}.png", "conversations": conv})
    recs.append({"id": "text-only", "conversations": [{"from": "human", "value": "hi"}]})
    (root / "test.json").write_text(json.dumps(recs))
    return root


def test_coinciding_features_give_perfect_recall(data):
    r = retrieval_eval(FakeRetrievalModel(), data, batch_size=5)
    assert r["n"] == N and r["skipped"] == 1
    assert r["i2t"] == {"R@1": 1.0, "R@5": 1.0, "R@10": 1.0}
    assert r["t2i"] == {"R@1": 1.0, "R@5": 1.0, "R@10": 1.0}
    assert r["mean_recall"] == 1.0


def test_shuffled_captions_lower_recall(data):
    perm = [(k + 1) % N for k in range(N)]  # every caption points at another image's feature
    r = retrieval_eval(FakeRetrievalModel(perm), data)
    assert r["i2t"]["R@1"] < 0.5 and r["t2i"]["R@1"] < 0.5
    assert r["mean_recall"] < 1.0
    limited = retrieval_eval(FakeRetrievalModel(), data, limit=4)
    assert limited["n"] == 4 and limited["i2t"]["R@1"] == 1.0


def test_duplicate_captions_are_joint_positives():
    sim = torch.tensor([[0.0, 1.0, 0.5], [1.0, 0.0, 0.5], [0.0, 0.0, 1.0]])
    r = retrieval_scores(sim, ["a", "a", "b"])  # images 0 and 1 share caption "a"
    assert r["i2t"]["R@1"] == 1.0 and r["t2i"]["R@1"] == 1.0
    r = retrieval_scores(sim, ["a", "b", "c"])
    assert r["i2t"]["R@1"] == pytest.approx(1 / 3)


def test_bare_vit_is_refused(data, tmp_path):
    vit = NativeViT(
        NativeViTConfig(hidden_size=32, num_layers=1, num_heads=4, intermediate_size=64, pos_grid=4)
    )
    with pytest.raises(TypeError, match="text side"):
        retrieval_eval(vit, data)
    vit.save_pretrained(tmp_path / "vit")
    with pytest.raises(ValueError, match=r"vlm_config\.json"):
        retrieval_main(tmp_path / "vit", data)
