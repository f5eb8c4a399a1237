"""``torchrun`` worker for tests/test_fsdp_full.py and tests/test_resume_world_size.py: several tiny
runs in one launch (2 processes, gloo, CPU), each ``cmpt train`` of a recipe with ``--set``s.

Usage: ``python -m torch.distributed.run --nproc_per_node=2 tests/fsdp_full_worker.py OUT SPEC``;
``SPEC`` is a JSON file ``{"runs": [{"name": ..., "recipe": ..., "sets": [...], "probe": bool,
"guard": bool}, ...]}`` (``recipe`` defaults to ``tiny/comp_stage2``). With ``probe``, rank 0 writes
``OUT/<name>.probe.pt`` right after the model is built (before any step): the full state dict
gathered from the shards, every rank's buffers and the tensors its modules hold on the meta device,
the parameter dtypes as sharded and the dtype of a decoder layer's weight during the forward. With
``guard``, reading a safetensors file (``safe_open``, through which ``load_file`` and transformers
read) raises on ranks > 0, and ``OUT/<name>.reads.json`` lists the files each rank opened.
"""

from __future__ import annotations

import os

import safetensors

READS: list[str] = []
GUARD = {"on": False}
_safe_open = safetensors.safe_open


def _guarded_safe_open(path, *args, **kwargs):
    if GUARD["on"]:
        READS.append(str(path))
        if int(os.environ["RANK"]) > 0:
            raise AssertionError(f"rank {os.environ['RANK']} opened the weight file {path}")
    return _safe_open(path, *args, **kwargs)


# before anything binds safe_open (safetensors.torch, transformers and cmpt import it by name)
safetensors.safe_open = _guarded_safe_open

import json  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import safetensors.torch  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from cmpt.recipes import run_recipe  # noqa: E402
from cmpt.train.distributed import destroy  # noqa: E402
from cmpt.train.final_weights import full_state_dict  # noqa: E402
from cmpt.train.loop import Trainer  # noqa: E402

assert safetensors.torch.safe_open is _guarded_safe_open, "safetensors.torch was imported before the guard"
OUT, SPEC = Path(sys.argv[1]), json.loads(Path(sys.argv[2]).read_text())
_build = Trainer._build_model
PROBE: dict[str, str | None] = {"name": None}


def _meta_tensors(module: torch.nn.Module) -> list[str]:
    """Tensors still on the meta device: parameters, buffers and plain tensor attributes."""
    found = [n for n, t in [*module.named_parameters(), *module.named_buffers()] if t.is_meta]
    for prefix, m in module.named_modules():
        found += [f"{prefix}.{k}" for k, v in vars(m).items() if isinstance(v, torch.Tensor) and v.is_meta]
    return found


def _build_and_probe(self: Trainer) -> None:
    _build(self)
    if PROBE["name"] is None:
        return
    state = full_state_dict(self.module)  # collective
    persistent = self.module.state_dict()
    computed = {n: b.detach().cpu().clone() for n, b in self.module.named_buffers() if n not in persistent}
    buffers = {n: b.detach().cpu().clone() for n, b in self.module.named_buffers()}
    ranks: list = [None] * dist.get_world_size()
    dist.all_gather_object(ranks, {"buffers": buffers, "meta": _meta_tensors(self.module)})
    backbone = getattr(self.task, "vlm", None) or self.task.backbone
    layer = backbone.body.layers[0].self_attn.q_proj
    seen: list[str] = []
    layer.register_forward_hook(lambda m, i, o: seen.append(str(m.weight.dtype)))
    if self.world.is_main:
        probe = {
            "state": state,
            "computed": computed,
            "ranks": ranks,
            "sharded": sorted({f"{type(p).__name__}:{p.dtype}" for p in self.module.parameters()}),
            "forward_dtypes": seen,  # filled during the first step, saved again after the run
        }
        PROBE["data"] = probe


def main() -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    Trainer._build_model = _build_and_probe
    for run in SPEC["runs"]:
        PROBE["name"] = run["name"] if run.get("probe") else None
        GUARD["on"] = bool(run.get("guard"))
        READS.clear()
        summary = run_recipe(run.get("recipe", "tiny/comp_stage2"), run["sets"])
        assert summary["status"] == "finished", summary
        GUARD["on"] = False
        reads: list = [None] * dist.get_world_size()
        dist.all_gather_object(reads, list(READS))
        if dist.get_rank() == 0:
            if PROBE["name"] is not None:
                torch.save(PROBE.pop("data"), OUT / f"{run['name']}.probe.pt")
            if run.get("guard"):
                (OUT / f"{run['name']}.reads.json").write_text(json.dumps(reads))
    destroy()  # after a barrier, letting gloo free its finished work first


if __name__ == "__main__":
    main()
