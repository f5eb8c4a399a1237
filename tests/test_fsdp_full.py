"""FSDP2 done fully (docs/method.md §6 "Distributed training", "Activation memory"): meta-device build
with rank 0's weights loaded once (ranks > 0 build a skeleton and read no weight file; CoMP stage
II and MoCa CPT), bf16 mixed precision with fp32 reduction, ``final/`` gathered without rebuilding
the model, selective activation checkpointing.

Fast tests run in one process (a 1-rank gloo group for FSDP2); the slow ones check the runs of
tests/fsdp_runs.py (one 2-process launch shared with tests/test_resume_world_size.py).
"""

from __future__ import annotations

import copy
import filecmp
import json
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import LlamaConfig, LlamaForCausalLM

from cmpt.config import ConfigError, load_config
from cmpt.train import distributed as D
from cmpt.train.config import TrainConfig
from cmpt.train.final_weights import full_state_dict
from fsdp_runs import losses, make_runs, moca_sets, stage2_sets


def _tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
        attn_implementation="sdpa",
    )
    return LlamaForCausalLM(cfg).train()


def _loss(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    logits = model(input_ids=ids, use_cache=False).logits  # a KV cache would be state changed by the forward
    return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())


class _Retained(TorchDispatchMode):
    """Records the storage of every tensor an op produces, to count what is still alive later."""

    def __init__(self) -> None:
        super().__init__()
        self.refs: dict[int, tuple[StorageWeakRef, int]] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                s = t.untyped_storage()
                self.refs.setdefault(s.data_ptr(), (StorageWeakRef(s), s.nbytes()))
        return out

    def alive_bytes(self, skip: set[int]) -> int:
        return sum(n for ptr, (ref, n) in self.refs.items() if ptr not in skip and not ref.expired())


def _saved_bytes_and_grads(mode: str, every: int, ids: torch.Tensor) -> tuple[int, dict[str, torch.Tensor]]:
    """Bytes the forward leaves alive for the backward (the loss aside), and the gradients."""
    model = _tiny_llama()
    if mode != "none":
        D.apply_activation_checkpointing(model.model.layers, mode, every)
    probe = _Retained()
    with probe:
        loss = _loss(model, ids)
    skip = {p.untyped_storage().data_ptr() for p in model.parameters()}  # views of the weights
    saved = probe.alive_bytes(skip | {loss.untyped_storage().data_ptr()})
    loss.backward()
    return saved, {n: p.grad.clone() for n, p in model.named_parameters()}


def test_selective_checkpointing_equal_gradients_less_memory() -> None:
    ids = torch.randint(0, 64, (2, 48), generator=torch.Generator().manual_seed(1))
    base_bytes, base = _saved_bytes_and_grads("none", 1, ids)
    measured = {}
    for mode, every in (("full", 1), ("selective", 1), ("full", 2)):
        measured[mode, every], grads = _saved_bytes_and_grads(mode, every, ids)
        for name, g in base.items():
            torch.testing.assert_close(grads[name], g, atol=1e-6, rtol=0, msg=f"{mode}/{every}: {name}")
    # selective keeps matmul outputs: between full checkpointing and none
    assert measured["full", 1] < measured["selective", 1] < base_bytes, (measured, base_bytes)
    assert measured["full", 1] < measured["full", 2] < base_bytes, (measured, base_bytes)


def test_activation_checkpointing_config() -> None:
    assert TrainConfig().ac_mode == "none" and TrainConfig(activation_checkpointing=True).ac_mode == "full"
    cfg = load_config(TrainConfig, {"activation_checkpointing": "selective", "ac_every": 2})
    assert (cfg.ac_mode, cfg.ac_every) == ("selective", 2)
    with pytest.raises(ConfigError):
        load_config(TrainConfig, {"activation_checkpointing": "sometimes"})
    with pytest.raises(ValueError, match="ac_every"):
        TrainConfig(ac_every=0)


@pytest.fixture
def one_rank_group(tmp_path: Path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("bf16", [False, True])
def test_meta_build_equals_eager_and_restores_computed_buffers(one_rank_group, bf16: bool) -> None:
    eager = _tiny_llama()
    model = copy.deepcopy(eager)
    rope = model.model.rotary_emb
    assert "inv_freq" not in model.state_dict()  # computed, not loaded: the classic to_empty bug
    D.shard_fsdp(model, model.model.layers, torch.device("cpu"), D.mixed_precision(bf16))
    assert all(type(p).__name__ == "DTensor" and p.dtype == torch.float32 for p in model.parameters())
    assert model.lm_head.weight is model.model.embed_tokens.weight  # still tied
    assert torch.equal(rope.inv_freq, eager.model.rotary_emb.inv_freq)
    full = full_state_dict(model)
    ref = eager.state_dict()
    assert full.keys() == ref.keys() and all(torch.equal(full[k], ref[k]) for k in ref)
    seen = []
    model.model.layers[0].mlp.up_proj.register_forward_hook(lambda m, i, o: seen.append(m.weight.dtype))
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(2))
    amp = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else torch.autocast("cpu", enabled=False)
    with amp:
        got, want = _loss(model, ids), _loss(eager, ids)
    assert seen == [torch.bfloat16 if bf16 else torch.float32]
    if bf16:  # bf16 weights (FSDP2) vs fp32 weights under autocast: the norms' gains differ in dtype
        torch.testing.assert_close(got, want, rtol=2e-2, atol=0)
    else:
        assert torch.equal(got, want)
    got.backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in model.parameters())


# ----------------------------------------------------------------------------- 2 processes


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_runs(tmp_path_factory.mktemp("fsdp_runs"))


def _assert_sharded_equals_eager(runs: Path, name: str, eager: torch.nn.Module) -> None:
    """The probe of run ``name`` (gathered shards, every rank's buffers) equals ``eager`` bit for bit,
    and rank 1 built its model without opening a weight file (the worker's guard would have raised;
    rank 0's reads show that the guard sees the real loaders)."""
    probe = torch.load(runs / f"{name}.probe.pt", weights_only=True)
    ref = eager.state_dict()
    assert probe["state"].keys() == ref.keys()
    assert [k for k in ref if not torch.equal(probe["state"][k], ref[k])] == []
    buffers = dict(eager.named_buffers())
    computed = {n: b for n, b in buffers.items() if n not in ref}
    assert computed and probe["computed"].keys() == computed.keys()
    assert all(torch.equal(probe["computed"][n], b) for n, b in computed.items())
    assert len(probe["ranks"]) == 2
    for rank in probe["ranks"]:  # rank 1's RoPE tables too: broadcast, not left as to_empty's garbage
        assert rank["meta"] == [] and rank["buffers"].keys() == buffers.keys()
        assert [n for n, b in buffers.items() if not torch.equal(rank["buffers"][n], b)] == []
    reads = json.loads((runs / f"{name}.reads.json").read_text())
    assert reads[1] == [] and any(r.endswith("model.safetensors") for r in reads[0]), reads


@pytest.mark.slow
def test_two_rank_meta_build_equals_the_eager_build_bit_for_bit(runs: Path) -> None:
    from cmpt.recipes import load_recipe
    from comp_fixtures import make_tiny_setup

    setup = make_tiny_setup(runs / "tiny")  # already there: the same paths
    cfg, task_cls = load_recipe("tiny/comp_stage2", stage2_sets(setup, runs, "eager", 2, 2))
    torch.manual_seed(cfg.run.seed)
    _assert_sharded_equals_eager(runs, "fsdp", task_cls(cfg).model)
    # the first step's loss (before any update): FSDP2 from meta = DDP's eager replicas = one process
    assert losses(runs / "fsdp")[0] == losses(runs / "ddp")[0] == losses(runs / "ref")[0]


@pytest.mark.slow
def test_two_rank_moca_meta_build_equals_the_eager_build_bit_for_bit(runs: Path) -> None:
    """MoCa CPT: the vocabulary grown by ``<|mask|>`` on meta, the MAE decoder copied from a
    skeleton layer and (with peft) LoRA adapters injected on meta equal rank 0's eager build."""
    from cmpt.recipes import load_recipe

    cfg, task_cls = load_recipe("tiny/moca_cpt", moca_sets(runs, "eager_moca", 2))
    torch.manual_seed(cfg.run.seed)
    eager = task_cls(cfg).model
    assert (cfg.model.lora_r > 0) == any("lora_" in n for n, _ in eager.named_parameters())
    _assert_sharded_equals_eager(runs, "moca_fsdp", eager)
    assert losses(runs / "moca_fsdp") == losses(runs / "moca_ref")


@pytest.mark.slow
def test_bf16_fsdp_shards_stay_fp32_while_the_forward_runs_bf16(runs: Path) -> None:
    probe = torch.load(runs / "bf16.probe.pt", weights_only=True)
    assert probe["sharded"] == ["DTensor:torch.float32"]
    assert probe["forward_dtypes"] and set(probe["forward_dtypes"]) == {"torch.bfloat16"}
    fp32 = torch.load(runs / "fsdp.probe.pt", weights_only=True)
    assert set(fp32["forward_dtypes"]) == {"torch.float32"}
    (loss,) = losses(runs / "bf16")
    assert loss == pytest.approx(losses(runs / "ref")[0], rel=2e-2) and loss != losses(runs / "ref")[0]
    assert (runs / "bf16" / "final" / "vlm_config.json").is_file()


@pytest.mark.slow
def test_fsdp_final_equals_the_rebuilt_export_file_for_file(runs: Path, tmp_path: Path) -> None:
    """``final/`` written from the gathered weights (no second model) equals what rebuilding the
    recipe's model and loading the same step gives (``cmpt export``, one process): every file."""
    from cmpt.cli import main

    ckpt = runs / "fsdp" / "checkpoints" / "step_000002"
    assert main(["export", str(ckpt), "--out", str(tmp_path / "x")]) == 0
    final, rebuilt = runs / "fsdp" / "final", tmp_path / "x"
    files = sorted(p.relative_to(final) for p in final.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(rebuilt) for p in rebuilt.rglob("*") if p.is_file())
    # completion markers (time, writer) and model cards (directory name, which checkpoint) say where
    # the files came from; everything else must be byte-identical
    compared = [f for f in files if f.name not in (".cmpt-complete.json", "README.md")]
    assert any(f.name == "model.safetensors" for f in compared) and Path("vit/model.safetensors") in compared
    different = [str(f) for f in compared if not filecmp.cmp(final / f, rebuilt / f, shallow=False)]
    assert different == []
