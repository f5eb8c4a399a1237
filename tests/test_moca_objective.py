"""MoCa stage 1's objective (docs/method.md §3): the MAE decoder starts as the LLM's middle layer,
L_MAE is 0 at the targets, masked windows never reach the ViT, and each loss term reaches the
gradients of exactly the parts it should."""

from __future__ import annotations

import pytest
import torch

from cmpt.data.pipeline import ProcessedSample, collate
from cmpt.losses import mae_loss, window_targets
from cmpt.recipes.moca import MocaLossConfig
from cmpt.recipes.moca_objective import MocaObjective
from cmpt.vlm.chat import VISION_TOKENS, encode_text_with_images, ensure_mask_token
from vlm_fixtures import PATCH_DIM, build_dirs, build_vlm, zero_grads

DOCS = [
    {
        "id": "d0",
        "grids": [(4, 4), (2, 2)],
        "text": "A chart <image> shows sales; next <image> the costs rise.",
    },
    {"id": "d1", "grids": [], "text": "Text only: the total of the table is twelve units."},
    {"id": "d2", "grids": [(2, 4)], "text": "<image>\nA red square above a blue dot."},
]


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    return build_dirs(tmp_path_factory.mktemp("moca"))


def _backbone(dirs, arch="llama"):
    vlm = build_vlm(dirs, arch)
    ensure_mask_token(vlm.tokenizer)
    vlm.resize_token_embeddings(len(vlm.tokenizer))
    return vlm.train()


def doc_batch(vlm, docs, seed=0, mlm_every=3, windows="alternate"):
    """Documents collated with a simple deterministic masking (every ``mlm_every``-th text token)."""
    tok, gen = vlm.tokenizer, torch.Generator().manual_seed(seed)
    mask_id = ensure_mask_token(tok)
    protected = {tok.convert_tokens_to_ids(t) for t in VISION_TOKENS}
    samples = []
    for d in docs:
        n_tok = [h * w // 4 for h, w in d["grids"]]
        ids = encode_text_with_images(d["text"], tok, n_tok, sample_id=d["id"])
        masked, labels = ids.clone(), torch.full_like(ids, -100)
        for j in range(0, len(ids), mlm_every):
            if int(ids[j]) not in protected:
                masked[j], labels[j] = mask_id, ids[j]
        n_win = sum(n_tok)
        if windows == "alternate":
            wmask = torch.arange(n_win) % 2 == 0
        else:
            wmask = torch.full((n_win,), windows == "all")
        patches = [torch.randn(h * w, PATCH_DIM, generator=gen) for h, w in d["grids"]]
        samples.append(
            ProcessedSample(
                d["id"],
                torch.cat(patches) if patches else torch.zeros(0, PATCH_DIM),
                list(d["grids"]),
                masked,
                labels,
                torch.zeros(0, dtype=torch.long),
                n_tok,
                window_mask=wmask,
            )
        )
    return collate(samples)


def test_mae_loss_is_zero_at_the_targets_and_windows_are_whole():
    patches = torch.randn(3 * 4, 5)  # 3 windows of 2×2 rows of 5 values
    mask = torch.tensor([True, False, True])
    target = window_targets(patches, mask, merge_size=2)
    assert target.shape == (2, 20)
    assert torch.equal(target[1], patches[8:12].reshape(-1))  # window 2 = rows 8..11
    total, count = mae_loss(target.clone().requires_grad_(), target)
    assert total.item() == 0.0 and count == 40
    total, count = mae_loss(target + 1.0, target)
    assert total.item() == pytest.approx(40.0) and count == 40
    with pytest.raises(ValueError, match="rows per window"):
        window_targets(patches[:-1], mask, merge_size=2)


def test_decoder_starts_as_the_middle_layer(dirs):
    vlm = _backbone(dirs)
    obj = MocaObjective(vlm, MocaLossConfig())
    mid = vlm.body.layers[len(vlm.body.layers) // 2]
    a, b = obj.mae_decoder.state_dict(), mid.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert obj.mae_decoder is not mid and obj.mae_head.bias.abs().sum() == 0
    assert 0.015 < obj.mae_head.weight.std().item() < 0.025
    assert obj.mae_head.out_features == 4 * vlm.patch_dim


def test_counts_and_masked_windows_never_reach_the_vit(dirs):
    vlm = _backbone(dirs)
    obj = MocaObjective(vlm, MocaLossConfig())
    batch = doc_batch(vlm, DOCS)
    with torch.no_grad():
        out = obj(batch)
        assert out["mlm_count"] == batch["num_mlm_tokens"] > 0
        assert out["mae_count"] == batch["num_mae_windows"] * 4 * PATCH_DIM > 0
        # new pixels in the masked windows: same inputs to the ViT (they are replaced), same MLM loss
        rows = batch["mae_mask"].repeat_interleave(4)
        noisy = batch["patches"].clone()
        noisy[rows] += 5.0
        other = obj(dict(batch, patches=noisy))
        assert torch.equal(other["mlm_sum"], out["mlm_sum"])
        assert not torch.equal(other["mae_sum"], out["mae_sum"])  # the targets moved
        noisy = batch["patches"].clone()
        noisy[~rows] += 5.0  # visible windows do reach the model
        assert not torch.equal(obj(dict(batch, patches=noisy))["mlm_sum"], out["mlm_sum"])
        # the Gaussian fill is one vector per micro-batch, fixed by its sample ids
        assert torch.equal(obj(batch)["mae_sum"], out["mae_sum"])
        renamed = dict(batch, sample_ids=["x", "y", "z"])
        assert not torch.equal(obj(renamed)["mae_sum"], out["mae_sum"])


def _grad_parts(obj) -> dict[str, bool]:
    def touched(params):
        return any(p.grad is not None and p.grad.abs().sum() > 0 for p in params)

    parts = {**obj.backbone.parts(), **obj.parts()}
    return {name: touched(params) for name, params in parts.items()}


def test_each_loss_reaches_exactly_its_parts(dirs):
    vlm = _backbone(dirs, "llama")  # untied LM head: the head is its own part
    obj = MocaObjective(vlm, MocaLossConfig())
    batch = doc_batch(vlm, DOCS)
    zero_grads(obj)
    obj(batch)["mlm_sum"].backward()
    assert _grad_parts(obj) == {"vision": True, "merger": True, "llm": True, "lm_head": True, "mae": False}
    zero_grads(obj)
    obj(batch)["mae_sum"].backward()
    assert _grad_parts(obj) == {"vision": True, "merger": True, "llm": True, "lm_head": False, "mae": True}


def test_text_only_batch_keeps_every_part_in_the_graph(dirs):
    vlm = _backbone(dirs)
    obj = MocaObjective(vlm, MocaLossConfig(mask_fill="learned"))
    batch = doc_batch(vlm, [DOCS[1]])
    zero_grads(obj)
    out = obj(batch)
    assert out["mae_count"] == 0 and out["mae_sum"].item() == 0.0
    (out["mlm_sum"] + out["mae_sum"]).backward()
    for name, params in {**vlm.parts(), **obj.parts()}.items():
        assert all(p.grad is not None for p in params if p.requires_grad), name


def test_learned_fill_is_trained(dirs):
    vlm = _backbone(dirs)
    obj = MocaObjective(vlm, MocaLossConfig(mask_fill="learned"))
    zero_grads(obj)
    obj(doc_batch(vlm, DOCS))["mae_sum"].backward()
    assert obj.mask_vector.grad is not None and obj.mask_vector.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="mask_fill"):
        MocaObjective(vlm, MocaLossConfig(mask_fill="zeros"))


def test_mae_head_reads_the_decoder_at_the_masked_windows(dirs):
    """The MAE head's input rows are the decoder's outputs at the ``<|image_pad|>`` tokens of the
    masked windows, in order (not merely as many rows)."""
    vlm = _backbone(dirs)
    obj = MocaObjective(vlm, MocaLossConfig())
    batch = doc_batch(vlm, DOCS)
    seen = {}
    first = lambda o: o[0] if isinstance(o, tuple) else o  # noqa: E731 (a layer may return a tuple)
    obj.mae_decoder.register_forward_hook(lambda m, i, o: seen.update(dec=first(o)))
    obj.mae_head.register_forward_hook(lambda m, i, o: seen.update(head_in=i[0]))
    with torch.no_grad():
        obj(batch)
    ids = batch["input_ids"].reshape(-1)
    decoded = seen["dec"].reshape(-1, seen["dec"].shape[-1])
    assert decoded.shape[0] == ids.numel()  # one packed row
    pads = (ids == vlm.config.image_pad_id).nonzero().flatten()
    assert batch["mae_mask"].any() and not batch["mae_mask"].all()
    assert torch.equal(seen["head_in"], decoded[pads[batch["mae_mask"]]])
