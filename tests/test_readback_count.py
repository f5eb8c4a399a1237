"""``benchmarks/readback_count.py`` (docs/benchmarks.md "Host-device synchronisations"): the counter
sees each kind of device read-back, and the CoMP stage-II and MoCa CPT micro-batches of the GPU
benchmarks, placed as the trainer places them, read nothing back in their forward; ``Embedder.encode``
reads back once per window of inputs, and ``cmpt encode`` once per window of batches, not once per
forward."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture
def counter(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    return importlib.import_module("readback_count")


def test_each_read_back_is_counted_and_host_values_are_not(counter):
    rc = counter
    rc._Counter.lines.clear()
    t = rc._mark(torch.arange(6))
    host = torch.arange(6)
    t.tolist(), int(t.sum()), bool((t > 2).any()), t[t > 1], t[0].item(), t.cpu(), t.nonzero()
    torch.repeat_interleave(t, t)
    torch.repeat_interleave(t, t, output_size=15)  # sized on the host: no read-back
    host.tolist(), int(host.sum()), host[host > 1]  # host values: free
    kinds = [what for (_, what), k in rc._Counter.lines.items() for _ in range(k)]
    expected = ["tolist", "__int__", "__bool__", "boolean getitem", "item", "cpu", "nonzero"]
    expected.append("repeat_interleave")
    assert sorted(kinds) == sorted(expected)


def test_benchmark_micro_batches_read_nothing_back(counter):
    import cmpt.losses.lm as lm

    before = lm.to_device_async
    figures = counter.measure(1)
    assert lm.to_device_async is before  # the marking is undone
    assert figures["comp"]["per_microbatch"] == 0.0, figures["comp"]["lines"]
    assert figures["moca"]["per_microbatch"] == 0.0, figures["moca"]["lines"]
    # Embedder.encode: one read-back per window of inputs (its embeddings), none inside a forward
    embed = figures["embed"]
    assert list(embed["lines"]) and all(k.startswith("embed/embedder.py:") for k in embed["lines"])
    assert all(k.endswith(" cpu") for k in embed["lines"]) and embed["per_microbatch"] <= 0.25, embed
    # cmpt encode: patch tokens and pooled rows read back once per READBACK_WINDOW forwards
    encode = figures["encode"]
    assert list(encode["lines"]) and all(k.startswith("host_tensor.py:") for k in encode["lines"]), encode
    assert all(k.endswith(" cpu") for k in encode["lines"]) and encode["per_microbatch"] <= 0.5, encode


def test_before_names_a_directory_that_is_not_a_checkout(counter, tmp_path):
    with pytest.raises(SystemExit, match="not a cmpt checkout"):
        counter.main(["--before", str(tmp_path), "--micro-batches", "1"])
