"""``torchrun`` worker for tests/test_fsdp_full.py and tests/test_resume_world_size.py: several tiny
CoMP stage-II runs in one launch (2 processes, gloo, CPU), each ``cmpt train`` with ``--set``s.

Usage: ``python -m torch.distributed.run --nproc_per_node=2 tests/fsdp_full_worker.py OUT SPEC``;
``SPEC`` is a JSON file ``{"runs": [{"name": ..., "sets": [...], "probe": bool}, ...]}``. With
``probe``, rank 0 writes ``OUT/<name>.probe.pt`` right after the model is built (before any step):
the full state dict gathered from the shards, the computed (non-persistent) buffers, the
parameter dtypes as sharded and the dtype of a decoder layer's weight during the forward.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from cmpt.recipes import run_recipe
from cmpt.train.final_weights import full_state_dict
from cmpt.train.loop import Trainer

OUT, SPEC = Path(sys.argv[1]), json.loads(Path(sys.argv[2]).read_text())
_build = Trainer._build_model
PROBE: dict[str, str | None] = {"name": None}


def _build_and_probe(self: Trainer) -> None:
    _build(self)
    if PROBE["name"] is None:
        return
    state = full_state_dict(self.module)  # collective
    persistent = self.module.state_dict()
    computed = {n: b.detach().cpu().clone() for n, b in self.module.named_buffers() if n not in persistent}
    layer = self.task.vlm.llm.model.layers[0].self_attn.q_proj
    seen: list[str] = []
    layer.register_forward_hook(lambda m, i, o: seen.append(str(m.weight.dtype)))
    if self.world.is_main:
        probe = {
            "state": state,
            "computed": computed,
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
        summary = run_recipe("tiny/comp_stage2", run["sets"])
        assert summary["status"] == "finished", summary
        if PROBE["name"] is not None and dist.get_rank() == 0:
            torch.save(PROBE.pop("data"), OUT / f"{run['name']}.probe.pt")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
