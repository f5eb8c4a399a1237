"""Parts of ``bench_moca_step.py``: the MAE decoder branch taken out of a MoCa CPT step or timed
inside it, and the held-out MLM / MAE evaluation of the objective (docs/method.md §3)."""

from __future__ import annotations

import contextlib
import time

import torch
from torch import nn


def patches_of(batch: dict) -> int:
    p = batch.get("patches")
    return 0 if p is None else int(p.shape[0])


class _ZeroHead(nn.Module):
    def __init__(self, out_features: int) -> None:
        super().__init__()
        self.out_features = out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.detach().new_zeros(x.shape[0], self.out_features)


@contextlib.contextmanager
def mae_branch_skipped(objective):
    """The objective with its MAE decoder layer and head out of the step: ``run_layer`` returns its
    input, the head returns zeros without gradient (the MAE loss becomes a constant)."""
    bb, head = objective.backbone, objective.mae_head
    bb.run_layer = lambda layer, hidden, out: hidden
    objective.mae_head = _ZeroHead(head.out_features)
    try:
        yield
    finally:
        del bb.run_layer  # back to the class's method
        objective.mae_head = head


class DecoderTimer:
    """Wall time of the MAE decoder layer + head inside the real step (see the module docstring),
    and the bytes autograd saves while they run forward."""

    def __init__(self, objective) -> None:
        self.objective, self.bb = objective, objective.backbone
        self.fwd = self.bwd = 0.0
        self.inside = False
        self._marks: dict[str, float] = {}

    def reset(self) -> None:
        self.fwd = self.bwd = 0.0

    def end_step(self) -> None:
        """Add the backward stretch of the last step (call after ``backward``)."""
        m = self._marks
        if "start" in m and "end" in m:
            self.bwd += m["end"] - m["start"]
        m.clear()

    def _mark(self, name: str) -> None:
        self._marks[name] = time.perf_counter()

    def __enter__(self) -> DecoderTimer:
        run_layer, head = self.bb.run_layer, self.objective.mae_head

        def timed_run_layer(layer, hidden, out):
            t0 = time.perf_counter()
            self.inside = True
            try:
                x = hidden.view_as(hidden)
                if x.grad_fn is not None:
                    x.grad_fn.register_hook(lambda gi, go: self._mark("end"))
                return run_layer(layer, x, out)
            finally:
                self.inside = False
                self.fwd += time.perf_counter() - t0

        def pre(module, args):
            self._t_head, self.inside = time.perf_counter(), True

        def post(module, args, y):
            self.inside = False
            self.fwd += time.perf_counter() - self._t_head
            if y.grad_fn is not None:
                y.grad_fn.register_prehook(lambda go: self._mark("start"))

        self.bb.run_layer = timed_run_layer
        self._handles = [head.register_forward_pre_hook(pre), head.register_forward_hook(post)]
        return self

    def __exit__(self, *exc) -> None:
        del self.bb.run_layer
        for h in self._handles:
            h.remove()


@torch.no_grad()
def evaluate(task, batches: list[dict], constant: int = -1) -> dict[str, float]:
    """MLM accuracy / loss and MAE loss of the task's objective on fixed held-out batches."""
    from cmpt.losses import window_targets

    obj, bb = task.model, task.backbone
    was_training = obj.training
    obj.eval()
    captured = []
    handle = bb.register_forward_hook(lambda module, args, out: captured.append(out))
    acc = {"correct": 0, "masked": 0, "mlm_sum": 0.0, "mlm_count": 0, "mae_sum": 0.0, "mae_count": 0}
    zero_sum, hits_constant = 0.0, 0
    try:
        for b in batches:
            captured.clear()
            res = obj(b)
            hidden = captured[-1].hidden
            labels = b["labels"].reshape(-1).to(hidden.device)
            at = labels != -100
            logits = bb.lm_head(hidden[at])
            acc["correct"] += int((logits.argmax(-1) == labels[at]).sum())
            acc["masked"] += int(at.sum())
            hits_constant += int((labels[at] == constant).sum())
            for k in ("mlm_sum", "mlm_count", "mae_sum", "mae_count"):
                acc[k] += float(res[k]) if k.endswith("sum") else int(res[k])
            if patches_of(b):
                target = window_targets(bb.prepare_patches(b["patches"]), b["mae_mask"], bb.config.merge_size)
                zero_sum += float((target.double() ** 2).sum())
    finally:
        handle.remove()
        obj.train(was_training)
    assert acc["masked"] == acc["mlm_count"], (acc["masked"], acc["mlm_count"])
    return {
        "mlm_acc": acc["correct"] / max(acc["masked"], 1),
        "mlm_loss": acc["mlm_sum"] / max(acc["mlm_count"], 1),
        "mae_loss": acc["mae_sum"] / max(acc["mae_count"], 1),
        "mae_zero": zero_sum / max(acc["mae_count"], 1),
        "mlm_acc_constant": hits_constant / max(acc["masked"], 1),
        "masked_tokens": acc["masked"],
        "mae_elements": acc["mae_count"],
    }
