"""``torchrun`` worker for tests/test_bad_data_policy.py: bad data on one rank only (gloo, CPU).

Usage: ``python -m torch.distributed.run --nproc_per_node=2 tests/bad_data_worker.py OUT TOKENIZER``.
The process group is started here, so both trainings reuse it; each rank writes the message of the
:class:`~cmpt.train.BadDataError` it raised to ``OUT/<run>_rank<r>.txt``:

* ``toy``: the toy task, where every micro-batch of rank 1 (only) reports one skipped sample; the
  error is caught and the launch goes on, on the same process group (the ranks stayed in step);
* ``corpus``: a real :class:`~cmpt.data.batching.BatchLoader` over a LLaVA JSONL corpus whose odd
  records (rank 1's whole share) have missing images, so rank 1 never yields a usable sample; the
  error propagates and the launch exits non-zero.
"""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from broken_corpus import conv, tiny_processor
from cmpt.data.batching import BatchLoader, TokenBudgetBatcher
from cmpt.data.llava_source import LlavaSource
from cmpt.data.pipeline import LengthIndex, SampleBuilder
from cmpt.train import BadDataError, LossTerms, OptimConfig, RunConfig, TrainConfig, Trainer
from toy_task import ToyLoader, ToyTask

TOY = {"max_bad_fraction": 0.1, "bad_check_min_samples": 40}
CORPUS = {"max_bad_fraction": 0.3, "bad_check_min_samples": 50}
CORPUS_RECORDS = 40


class RankOneBadToyTask(ToyTask):
    """Rank 1's micro-batches each report one bad sample; rank 0's none."""

    def build_loader(self, rank: int, world_size: int) -> ToyLoader:
        return ToyLoader(self.seed, rank, world_size, bad_every=1 if rank == 1 else 0)


def write_corpus(path: Path) -> None:
    """Even records are good (text only), odd ones name a missing image: with one sample per
    micro-batch, no shuffling and 2 ranks, rank 1 reads only bad samples."""
    rows = []
    for i in range(CORPUS_RECORDS):
        if i % 2:
            rows.append({"id": f"bad{i}", "image": "missing.png", "conversations": conv()})
        else:
            rows.append({"id": f"ok{i}", "conversations": conv("Hi", f"Yes {i}.")})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


class CorpusTask:
    """A one-parameter task over the real loader (its loss reads only ``num_samples``)."""

    def __init__(self, data: Path, tokenizer_dir: Path) -> None:
        from transformers import AutoTokenizer

        torch.manual_seed(0)
        self.model = nn.Linear(1, 1)
        self.data, self.tok = data, AutoTokenizer.from_pretrained(str(tokenizer_dir))

    def param_groups(self) -> list[dict]:
        return [{"name": "all", "params": list(self.model.parameters()), "lr": 1e-3}]

    def fsdp_units(self) -> list[nn.Module]:
        return []

    def build_loader(self, rank: int, world_size: int) -> BatchLoader:
        src, proc = LlavaSource(self.data), tiny_processor()
        lengths = LengthIndex.build(src, proc, self.tok).lengths
        batcher = TokenBudgetBatcher(lengths, 64, 512, 1, shuffle=False)
        builder = SampleBuilder(proc, self.tok, max_text_tokens=64, caption_max_tokens=16)
        return BatchLoader(src, builder, batcher, rank=rank, world_size=world_size)

    def compute_loss(self, model: nn.Module, batch: dict) -> LossTerms:
        n = int(batch["num_samples"])
        out = model(torch.ones(n, 1))
        return LossTerms(sums={"x": out.pow(2).sum()}, counts={"x": n}, weights={"x": 1.0})


def fit(out: Path, name: str, task: object, **train_kw) -> None:
    cfg = TrainConfig(steps=50, log_every=1, progress=False, tensorboard=False, **train_kw)
    run = RunConfig(dir=str(out / name), seed=0, name=name)
    try:
        Trainer(run, OptimConfig(lr=1e-3), cfg, task).fit()
    except BadDataError as e:
        (out / f"{name}_rank{dist.get_rank()}.txt").write_text(str(e))
        raise


def main() -> None:
    out, tokenizer_dir = Path(sys.argv[1]), Path(sys.argv[2])
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    with contextlib.suppress(BadDataError):  # every rank stops there: the same group carries on
        fit(out, "toy", RankOneBadToyTask(), **TOY)
    if dist.get_rank() == 0:
        write_corpus(out / "corpus.jsonl")
    dist.barrier()
    fit(out, "corpus", CorpusTask(out / "corpus.jsonl", tokenizer_dir), **CORPUS)  # raises: exit 1


if __name__ == "__main__":
    main()
