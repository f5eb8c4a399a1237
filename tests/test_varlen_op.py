"""``cmpt::varlen_sdpa`` (cmpt.vision.varlen_op) and ``varlen_attention``'s causal / scale / grouped
heads (docs/method.md §6 "Compiled blocks", §7): against an independent dense reference in float64,
its backward by finite differences, and under ``torch.compile`` with new segment lengths every call."""

from __future__ import annotations

import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

from cmpt.vision.attention import (
    AttentionPlan,
    build_plan,
    flash_available,
    sdpa_loop,
    torch_varlen_available,
    varlen_attention,
)
from cmpt.vision.varlen_op import varlen_sdpa

LENGTHS = [5, 3, 5, 0, 7, 3, 5]  # equal lengths share a kernel call; an empty segment


def _cu(lengths: list[int]) -> torch.Tensor:
    return torch.tensor([0, *lengths]).cumsum(0)


def dense_reference(q, k, v, lengths, causal, scale):
    """Attention in float64 with an explicit block-diagonal (and causal) mask; grouped heads expanded."""
    q, k, v = (t.double() for t in (q, k, v))
    g = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1)
    doc = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    allowed = doc[:, None] == doc[None, :]
    if causal:
        allowed &= torch.ones_like(allowed).tril()
    scores = torch.einsum("qhd,khd->hqk", q, k) * scale
    scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v)


def _qkv(n: int, heads: int, kv_heads: int, dtype=torch.float32, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    shapes = [(n, heads, 8), (n, kv_heads, 8), (n, kv_heads, 8)]
    return [torch.randn(s, generator=g, dtype=dtype).requires_grad_() for s in shapes]


@pytest.mark.parametrize("causal", [False, True])
def test_op_and_its_gradients_match_a_dense_reference(causal: bool) -> None:
    q, k, v = _qkv(sum(LENGTHS), 3, 3)
    out, lse = varlen_sdpa(q, k, v, _cu(LENGTHS), causal, 0.3)
    ref = dense_reference(q, k, v, LENGTHS, causal, 0.3)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)
    assert lse.shape == (sum(LENGTHS), 3) and lse.dtype == torch.float32
    w = torch.randn_like(ref)
    got = torch.autograd.grad((out.double() * w).sum(), (q, k, v))
    want = torch.autograd.grad((ref * w).sum(), (q, k, v))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b.float(), atol=1e-5, rtol=1e-4)


def test_op_backward_passes_gradcheck_and_opcheck() -> None:
    q, k, v = _qkv(sum(LENGTHS), 4, 2, dtype=torch.float64)  # grouped heads: two queries per key
    cu = _cu(LENGTHS)
    assert torch.autograd.gradcheck(lambda q, k, v: varlen_sdpa(q, k, v, cu, True, 0.5)[0], (q, k, v))
    torch.library.opcheck(torch.ops.cmpt.varlen_sdpa.default, (q, k, v, cu, True, 0.5))


def test_op_rejects_boundaries_that_do_not_cut_the_tokens() -> None:
    q, k, v = _qkv(10, 2, 2)
    with pytest.raises(ValueError, match="do not cut 10 tokens"):
        varlen_sdpa(q, k, v, _cu([4, 4]), False, 1.0)


@pytest.mark.parametrize("causal", [False, True])
def test_varlen_attention_takes_grouped_heads_scale_and_autocast(causal: bool) -> None:
    q, k, v = _qkv(sum(LENGTHS), 6, 2)  # three query heads per key/value head
    plan = build_plan(LENGTHS, "sdpa", q.device, q.dtype)
    out = varlen_attention(q, k, v, plan, causal=causal, scale=0.25)
    ref = dense_reference(q, k, v, LENGTHS, causal, 0.25)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)
    loop = sdpa_loop(q, k, v, plan, causal, 0.25)  # the path of CUDA in float32
    torch.testing.assert_close(loop.double(), ref, atol=1e-5, rtol=1e-5)
    # under autocast the three inputs may differ in dtype (rotary output in float32): SDPA's rule
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = varlen_attention(q, k, v.bfloat16(), plan, causal=causal, scale=0.25)
    assert low.dtype == torch.bfloat16
    torch.testing.assert_close(low.float(), out, atol=3e-2, rtol=3e-2)


def test_loop_runs_no_kernel_on_an_empty_segment(monkeypatch) -> None:
    """The per-segment loop (CUDA in float32) calls SDPA once per distinct non-zero length: an
    empty text gets its empty output without a kernel call, which some CUDA kernels refuse."""
    sdpa, lengths = torch.nn.functional.scaled_dot_product_attention, []

    def counted(q, *args, **kwargs):
        lengths.append(q.shape[-2])
        return sdpa(q, *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", counted)
    q, k, v = _qkv(sum(LENGTHS), 4, 2)
    out = sdpa_loop(q, k, v, build_plan(LENGTHS, "sdpa", q.device, q.dtype), True, None)
    assert sorted(lengths) == [3, 5, 7]
    ref = dense_reference(q, k, v, LENGTHS, True, 8**-0.5)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("causal", [False, True])
def test_flex_backend_takes_causal_and_grouped_heads(causal: bool) -> None:
    lengths = [16, 24, 8, 16]
    q, k, v = (t.detach() for t in _qkv(sum(lengths), 4, 2))  # no flex backward on the CPU
    plan = build_plan(lengths, "flex", q.device, q.dtype)
    out = varlen_attention(q, k, v, plan, causal=causal)
    ref = dense_reference(q, k, v, lengths, causal, 8**-0.5)
    torch.testing.assert_close(out.double(), ref, atol=1e-4, rtol=1e-4)


def test_compiled_attention_does_not_recompile_for_new_lengths() -> None:
    """Six layouts (other counts and lengths of segments): a compiled function around
    ``varlen_attention`` compiles at most twice (static, then dynamic shapes) with AOTAutograd
    tracing the operator's forward and backward on fake tensors, and matches eager."""

    def step(q, k, v, plan):
        return varlen_attention(q * 2, k, v, plan, causal=True).square().sum()

    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(step, backend="aot_eager")
    layouts = [[5, 3], [7, 2, 4], [1, 1, 1, 9], [6], [3, 3, 3, 3, 3], [10, 1]]
    for i, lengths in enumerate(layouts):
        q, k, v = _qkv(sum(lengths), 4, 2, seed=i)
        plan = build_plan(lengths, "sdpa", q.device, q.dtype)
        got = torch.autograd.grad(compiled(q, k, v, plan), (q, k, v))
        want = torch.autograd.grad(step(q, k, v, plan), (q, k, v))
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b)
    assert counters["stats"]["unique_graphs"] <= 2, dict(counters["stats"])
    assert counters["graph_break"] == {}
    torch._dynamo.reset()


@pytest.mark.skipif(not torch_varlen_available(), reason="torch < 2.10 has no varlen_attn")
def test_cuda_varlen_path_traces_into_one_graph_for_all_layouts() -> None:
    """The half-precision CUDA path (torch's ``varlen_attn``) under ``torch.compile(fullgraph=True)``
    and bf16 autocast: traced here on fake tensors (the kernel needs CUDA, so the backend never runs
    the graph) — no graph break, one dynamic graph for new lengths and counts of segments, and the
    kernel gets one dtype (autocast's) though query and key come in float32."""
    graphs: list[torch.fx.GraphModule] = []

    def capture(gm: torch.fx.GraphModule, example_inputs):
        graphs.append(gm)
        return lambda *args: [torch.zeros(())]  # stands in for the graph's one output

    def step(q, k, v, plan):
        with torch.autocast(q.device.type, dtype=torch.bfloat16):
            return varlen_attention(q, k, v, plan, causal=True, scale=0.125).sum()

    torch._dynamo.reset()
    compiled = torch.compile(step, backend=capture, fullgraph=True)
    for lengths in ([5, 3], [7, 2, 4], [1, 1, 1, 9]):
        q, k, v = (t.detach() for t in _qkv(sum(lengths), 4, 2))  # float32 query and key (rotary)
        compiled(q, k, v.bfloat16(), AttentionPlan(lengths, "varlen", q.device))
    torch._dynamo.reset()
    assert len(graphs) == 2  # static shapes, then dynamic ones
    for g in graphs:
        (kernel,) = [n for n in g.graph.nodes if "varlen_attn" in str(n.target)]
        assert [a.meta["example_value"].dtype for a in kernel.args[:3]] == [torch.bfloat16] * 3


CUDA_BACKENDS = [
    pytest.param("sdpa", torch.float32, id="sdpa-fp32-loop"),
    pytest.param(
        "flash", torch.bfloat16, marks=pytest.mark.skipif(not flash_available(), reason="needs flash-attn")
    ),
    pytest.param(
        "varlen", torch.bfloat16, marks=pytest.mark.skipif(not torch_varlen_available(), reason="torch<2.10")
    ),
]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize(("backend", "dtype"), CUDA_BACKENDS)
def test_cuda_backends_take_causal_grouped_heads_and_scale(backend: str, dtype: torch.dtype) -> None:
    """What packed text runs on a GPU: causal, 3 query heads per key/value head, a scale."""
    q, k, v = (t.detach().cuda().to(dtype).requires_grad_() for t in _qkv(sum(LENGTHS), 6, 2))
    plan = build_plan(LENGTHS, backend, q.device, q.dtype)
    out = varlen_attention(q, k, v, plan, causal=True, scale=0.2)
    ref = dense_reference(q, k, v, LENGTHS, True, 0.2)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.double(), ref, atol=tol, rtol=tol)
    w = torch.randn_like(ref)
    got = torch.autograd.grad((out.double() * w).sum(), (q, k, v))
    want = torch.autograd.grad((ref * w).sum(), (q, k, v))
    for a, b in zip(got, want):
        assert (a.double() - b).norm() / b.norm() < (1e-4 if dtype == torch.float32 else 2e-2)


@pytest.mark.slow
def test_benchmark_runs_and_reports_ratios(monkeypatch, capsys) -> None:
    """``benchmarks/bench_varlen_op.py`` on small shapes: a table, then the JSON line of ratios."""
    import importlib
    import json
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    bench = importlib.import_module("bench_varlen_op")
    result = bench.main(["--tokens", "512", "--reps", "1", "--layouts", "4", "--width", "256"])
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == result
    assert set(result["ratios_loop_over_op"]) == {
        "eager text, causal, GQA 14:2",
        "eager images, 256 tokens each",
        "eager images, mixed sizes",
        "compiled stream",
    }
    assert result["versions"]["op"] <= 2 < result["versions"]["loop"]


class _AttentionUnit(torch.nn.Module):
    """A linear, packed causal attention over its output, a linear: one checkpointable unit."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv, self.out = torch.nn.Linear(16, 48), torch.nn.Linear(16, 16)

    def forward(self, x: torch.Tensor, plan) -> torch.Tensor:
        q, k, v = self.qkv(x).unflatten(-1, (3, 2, 8)).unbind(1)
        return self.out(varlen_attention(q, k, v, plan, causal=True).flatten(1).tanh())


@pytest.mark.parametrize(("mode", "kernel_runs"), [(None, 1), ("full", 2), ("selective", 1)])
def test_selective_checkpointing_keeps_the_operators_output(monkeypatch, mode, kernel_runs) -> None:
    """Forward + backward of a checkpointed unit: full checkpointing runs the attention kernel again
    in backward, selective keeps its output (cmpt.train.distributed.SAVED_OPS) — same gradients."""
    from cmpt.train.distributed import apply_activation_checkpointing
    from cmpt.vision import varlen_op

    calls = []
    kernel = varlen_op._FORWARD
    monkeypatch.setattr(varlen_op, "_FORWARD", lambda *a, **kw: calls.append(1) or kernel(*a, **kw))
    torch.manual_seed(0)
    unit, plain = _AttentionUnit(), _AttentionUnit()
    plain.load_state_dict(unit.state_dict())
    if mode:
        apply_activation_checkpointing([unit], mode)
    x = torch.randn(12, 16)
    plan = build_plan([4, 4, 4], "sdpa", x.device, x.dtype)  # one run of segments: one kernel call
    unit(x, plan).square().sum().backward()
    assert len(calls) == kernel_runs
    plain(x, plan).square().sum().backward()
    for a, b in zip(unit.parameters(), plain.parameters()):
        torch.testing.assert_close(a.grad, b.grad)
