"""The tiny MoCa corpus: interleaved documents + text-only passages, train and val (docs/method.md §3).

:func:`prepare_moca_data` writes, under ``{cache}/tiny/moca`` (``tiny-quick`` for ``quick=True``),
where ``configs/tiny/moca_cpt.yaml`` looks::

    documents/{train,val}.jsonl + images/   passages/{train,val}.jsonl   train.yaml   val.yaml

``train.yaml`` / ``val.yaml`` are mixtures (:mod:`cmpt.data.mixture`) of the two kinds, so a CPT
run sees text-only, image–caption-like and interleaved inputs. Built once per settings (same
caching scheme as the tiny starting points: temporary directory, rename, completion marker).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from cmpt.demo.synth_documents import generate_documents, generate_passages
from cmpt.demo.synthetic import split_seed
from cmpt.demo.tiny_models import _build_cached, tiny_root

__all__ = ["MOCA_SIZES", "prepare_moca_data", "write_moca_corpus"]

#: (train, val) sizes per kind; quick runs use a quarter.
MOCA_SIZES = {"documents": (160, 32), "passages": (160, 32)}
FORMAT = 1


def write_moca_corpus(out: str | os.PathLike, sizes: dict[str, tuple[int, int]], seed: int = 0) -> dict:
    """Write documents and passages (``sizes[kind] = (train, val)``) and the two mixtures into
    ``out`` (``cmpt data synth --kind moca``); returns ``{"sizes": sizes}``."""
    out = Path(out)
    for split, i in (("train", 0), ("val", 1)):
        members = []
        for kind, counts in sizes.items():
            make = generate_documents if kind == "documents" else generate_passages
            path = make(counts[i], out / kind, seed=split_seed(seed, f"{kind}-{split}"), split=split)
            members.append({"path": str(path.relative_to(out))})
        (out / f"{split}.yaml").write_text(json.dumps({"datasets": members}, indent=1) + "\n")
    return {"sizes": sizes}


def prepare_moca_data(
    cache: str | os.PathLike | None = None, *, quick: bool = False, seed: int = 0
) -> dict[str, Path]:
    """Build (or reuse) the tiny MoCa corpus; returns ``{"train": train.yaml, "val": val.yaml}``."""
    sizes = {k: (max(4, a // 4), max(4, b // 4)) if quick else (a, b) for k, (a, b) in MOCA_SIZES.items()}
    root = tiny_root(cache, quick) / "moca"
    key = {"format": FORMAT, "sizes": {k: list(v) for k, v in sizes.items()}, "seed": seed}  # as stored
    _build_cached(root, key, lambda tmp: write_moca_corpus(tmp, sizes, seed), "MoCa documents + passages")
    return {"train": root / "train.yaml", "val": root / "val.yaml"}
