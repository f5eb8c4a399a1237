"""The LM-head cross-entropy implementations (docs/method.md §6 "LM-head memory"): ``loss.lm_impl``
selection, the start-time error for ``liger`` where it cannot run, and — on CUDA with liger-kernel —
Liger's fused linear CE against a float64 reference and cmpt's chunked loss."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from cmpt.config import ConfigError
from cmpt.losses import next_token_loss
from cmpt.losses.fused_ce import LM_IMPLS, check_lm_impl, liger_available, resolve_lm_impl
from cmpt.recipes import load_recipe
from cmpt.recipes.comp import LossConfig
from cmpt.recipes.comp_objective import CompObjective
from cmpt.train.distributed import to_device
from vlm_fixtures import TWO, build_dirs, build_vlm, make_batch

H, V = 16, 37
LIGER_RUNS = torch.cuda.is_available() and liger_available()
needs_liger = pytest.mark.skipif(not LIGER_RUNS, reason="needs CUDA and liger-kernel (cmpt[liger])")


def _setup(shape, dtype=torch.float64, device="cpu", seed=0, bias=False):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(*shape, H, generator=g, dtype=torch.float64)
    labels = torch.randint(0, V, shape, generator=g)
    labels[torch.rand(shape, generator=g) < 0.3] = -100
    weight = torch.randn(V, H, generator=g, dtype=torch.float64) / H**0.5
    b = torch.randn(V, generator=g, dtype=torch.float64) if bias else None
    leaf = [
        t.to(device=device, dtype=dtype).requires_grad_(True) if t is not None else None
        for t in (hidden, weight, b)
    ]
    return leaf[0], labels.to(device), leaf[1], leaf[2]


def _reference(hidden, labels, weight, bias):
    """Plain float64 CE over full logits, shifted, mean over the supervised tokens."""
    logits = F.linear(hidden.double(), weight.double(), None if bias is None else bias.double())
    return F.cross_entropy(logits[..., :-1, :].reshape(-1, V), labels[..., 1:].reshape(-1), ignore_index=-100)


def _grads(loss, tensors):
    return torch.autograd.grad(loss, [t for t in tensors if t is not None])


def test_auto_on_cpu_is_the_chunked_loss_and_equals_plain_ce() -> None:
    hidden, labels, weight, bias = _setup((3, 12), bias=True)
    ref = _reference(hidden, labels, weight, bias)
    runs = {
        impl: next_token_loss(hidden, labels, weight, bias, chunk_size=5, reduction="mean", impl=impl)
        for impl in ("chunked", "auto")
    }
    (chunked, n1), (auto, n2) = runs["chunked"], runs["auto"]
    assert n1 == n2 == int((labels[:, 1:] != -100).sum())
    assert torch.equal(chunked, auto)
    torch.testing.assert_close(chunked, ref, rtol=1e-12, atol=1e-12)
    for got, exp in zip(_grads(auto, (hidden, weight, bias)), _grads(ref, (hidden, weight, bias))):
        torch.testing.assert_close(got, exp, rtol=1e-10, atol=1e-12)


def test_selection() -> None:
    assert LM_IMPLS == ("auto", "chunked", "liger")
    assert resolve_lm_impl("auto", "cpu") == "chunked"
    assert resolve_lm_impl("chunked", "cpu") == "chunked"
    assert resolve_lm_impl("chunked", torch.device("cuda", 0)) == "chunked"
    assert resolve_lm_impl("auto", "cuda") == ("liger" if liger_available() else "chunked")
    with pytest.raises(ValueError, match=r"loss\.lm_impl=liger needs the loss on a CUDA device, got cpu"):
        resolve_lm_impl("liger", "cpu")
    for bad in ("fused", "Liger", ""):
        with pytest.raises(ValueError, match=r"loss\.lm_impl must be one of auto, chunked, liger"):
            resolve_lm_impl(bad, "cpu")
        with pytest.raises(ValueError, match=r"loss\.lm_impl must be one of"):
            check_lm_impl(bad)
    hidden, labels, weight, _ = _setup((2, 6))
    with pytest.raises(ValueError, match="needs the loss on a CUDA device"):
        next_token_loss(hidden, labels, weight, impl="liger")


def test_config_key() -> None:
    for recipe in ("tiny/comp_stage2", "tiny/moca_cpt"):
        assert load_recipe(recipe)[0].loss.lm_impl == "auto"
        assert load_recipe(recipe, ["loss.lm_impl=chunked"])[0].loss.lm_impl == "chunked"
        with pytest.raises(ConfigError, match=r"loss\.lm_impl"):
            load_recipe(recipe, ["loss.lm_impl=fused"])


def test_liger_whose_import_raises_any_error_counts_as_absent(monkeypatch) -> None:
    """An installed liger-kernel whose import raises more than ``ImportError`` (a triton or driver
    mismatch: RuntimeError, AttributeError) makes ``auto`` the chunked loss and ``liger`` a start-time
    error naming the cause; the reason is logged once."""
    import importlib.util
    import sys
    import types

    from cmpt.losses import fused_ce

    class Broken(types.ModuleType):  # what a triton failing at import time looks like to liger
        def __getattr__(self, name: str):
            raise RuntimeError("0 active drivers ([]). There should only be one.")

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: object() if name == "liger_kernel" else find_spec(name, *a),
    )
    monkeypatch.setitem(sys.modules, "liger_kernel.transformers.functional", Broken("functional"))
    warned: list[tuple] = []
    monkeypatch.setattr(fused_ce._log, "warning", lambda *args: warned.append(args))
    fused_ce._liger_import_error.cache_clear()
    try:
        assert not fused_ce.liger_available() and not fused_ce.liger_available()
        assert resolve_lm_impl("auto", "cuda") == "chunked"
        with pytest.raises(
            ValueError, match=r"liger-kernel does not import \(RuntimeError: 0 active drivers"
        ):
            check_lm_impl("liger")
    finally:
        fused_ce._liger_import_error.cache_clear()  # the real answer again for the other tests
    assert len(warned) == 1 and "RuntimeError" in warned[0][1]


@pytest.mark.skipif(LIGER_RUNS, reason="liger runs here: nothing to refuse")
def test_liger_where_it_cannot_run_is_an_error_at_start(tmp_path) -> None:
    vlm = build_vlm(build_dirs(tmp_path))
    if not liger_available():
        match = r"loss.lm_impl=liger: liger-kernel .*pip install 'cmpt\[liger\]'"
    else:
        match = "loss.lm_impl=liger runs only on CUDA"
    with pytest.raises(ValueError, match=match):
        check_lm_impl("liger")
    with pytest.raises(ValueError, match=match):
        CompObjective(vlm, LossConfig(align=False, lm_impl="liger"))
    out = CompObjective(vlm, LossConfig(align=False, lm_impl="auto"))(make_batch(vlm, TWO))
    assert out["lm_count"] > 0 and torch.isfinite(out["lm_sum"])


@pytest.mark.gpu
@needs_liger
@pytest.mark.parametrize("bias", [False, True])
def test_liger_equals_reference_float32(bias: bool) -> None:
    hidden, labels, weight, b = _setup((4, 33), dtype=torch.float32, device="cuda", bias=bias)
    ref = _reference(hidden, labels, weight, b)
    loss, count = next_token_loss(hidden, labels, weight, b, reduction="mean", impl="liger")
    assert count == int((labels[:, 1:] != -100).sum()) and loss.dtype == torch.float32
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-5)
    for got, exp in zip(_grads(loss, (hidden, weight, b)), _grads(ref, (hidden, weight, b))):
        torch.testing.assert_close(got.double(), exp, rtol=1e-4, atol=1e-5)
    summed, _ = next_token_loss(hidden, labels, weight, b, impl="auto")  # auto = liger here
    torch.testing.assert_close(summed.double(), ref * count, rtol=1e-5, atol=1e-4)


@pytest.mark.gpu
@needs_liger
def test_liger_equals_chunked_under_bf16_autocast() -> None:
    hidden, labels, weight, _ = _setup((2, 300), dtype=torch.float32, device="cuda", seed=3)
    out = {}
    for impl in ("chunked", "liger"):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss, _ = next_token_loss(hidden, labels, weight, chunk_size=64, impl=impl)
        out[impl] = (loss, *_grads(loss, (hidden, weight)))
    assert out["liger"][0].dtype == torch.float32
    for got, exp in zip(out["liger"], out["chunked"]):
        torch.testing.assert_close(got, exp, rtol=2e-2, atol=2e-2)


@pytest.mark.gpu
@needs_liger
def test_comp_objective_liger_equals_chunked(tmp_path) -> None:
    vlm = build_vlm(build_dirs(tmp_path)).cuda()
    batch = to_device(make_batch(vlm, TWO), torch.device("cuda"))
    sums = {}
    for impl in ("chunked", "liger"):
        out = CompObjective(vlm, LossConfig(align=False, lm_impl=impl))(batch)
        sums[impl] = (out["lm_sum"], out["lm_count"])
    assert sums["liger"][1] == sums["chunked"][1] > 0
    torch.testing.assert_close(sums["liger"][0], sums["chunked"][0], rtol=1e-5, atol=1e-4)
