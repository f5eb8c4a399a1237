"""Where an evaluation runs and where its results go (docs/method.md §5): the ``--device`` choice,
single-threaded probe heads on the CPU, and result files (``--out``: one JSON file, or a directory;
NaN written as ``null``)."""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from cmpt.hub import json_ready

__all__ = ["available_devices", "check_out_dir", "finish_result", "head_threads", "pick_device"]
__all__ += ["results_file", "write_json"]


def available_devices() -> list[str]:
    """The ``--device`` values this torch can use: ``auto``, ``cpu``, then ``cuda`` and ``cuda:N`` /
    ``mps`` and ``mps:0`` when present."""
    out = ["auto", "cpu"]
    if torch.cuda.is_available() and (n := torch.cuda.device_count()):
        out += ["cuda", *(f"cuda:{i}" for i in range(n))]
    if torch.backends.mps.is_available():
        out += ["mps", "mps:0"]  # one MPS device; torch names it either way
    return out


def pick_device(device: str | torch.device | None) -> torch.device:
    """``None`` / ``"auto"`` → CUDA when available, else CPU. A device this torch cannot use (a typo,
    ``cuda`` without a GPU or CUDA build, an index past the last GPU, ``mps`` off Apple silicon) is
    a ``ValueError`` listing :func:`available_devices`."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    usable = available_devices()
    try:
        dev = torch.device(device)
    except RuntimeError:
        dev = None
    if dev is not None and (dev.type == "cpu" or str(dev) in usable):
        return dev
    why = _why_unavailable(dev)
    raise ValueError(f"--device {str(device)!r} is not available here{why}; use one of: {', '.join(usable)}")


def _why_unavailable(dev: torch.device | None) -> str:
    """``" (reason)"`` for a well-formed device this torch cannot use; ``""`` for a malformed name."""
    if dev is None:
        return ""
    if dev.type == "cuda":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        return f" (this torch sees {n} CUDA GPU{'' if n == 1 else 's'})"
    if dev.type == "mps":
        return (
            " (MPS is not available)" if not torch.backends.mps.is_available() else " (MPS has one device: 0)"
        )
    return f" (cmpt runs on cpu, cuda or mps, not {dev.type})"


def results_file(out: str | os.PathLike | None, command: str) -> Path | None:
    """Where a one-file result goes: ``out`` itself, or ``out/<command>_results.json`` when ``out``
    ends with a path separator or is an existing directory (``--out evals/`` writes inside it)."""
    if out is None:
        return None
    path = Path(out)
    if str(out).endswith(("/", os.sep)) or path.is_dir():
        return path / f"{command}_results.json"
    return path


def check_out_dir(out: str | os.PathLike | None, command: str) -> None:
    """Refuse, before anything runs, an ``--out`` for a directory-writing command that is a file."""
    if out is not None and Path(out).exists() and not Path(out).is_dir():
        raise ValueError(
            f"--out {str(out)!r} is a file; `cmpt eval {command}` writes several files into a directory: "
            "pass a new or existing directory"
        )


@contextlib.contextmanager
def head_threads(device: torch.device | str) -> Iterator[None]:
    """Run the enclosed (small) probe-head training single-threaded on the CPU.

    A probe head's steps are tiny matrix products: intra-op threads only add synchronisation
    (on a busy 2-core host a 60×64 linear backward takes ~70 ms with 2 threads, 0.3 ms with one).
    The previous thread count is restored on exit; GPU runs are unaffected.
    """
    if torch.device(device).type != "cpu":
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def finish_result(result: dict[str, Any], out: str | os.PathLike | None, **provenance: Any) -> dict[str, Any]:
    """Add where the numbers came from (model, data) to ``result``; write it as JSON to ``out`` if given."""
    result.update(provenance)
    if out is not None:
        write_json(result, Path(out))
    return result


def write_json(obj: Any, path: str | os.PathLike) -> Path:
    """Write ``obj`` as indented JSON (atomic rename); NaN becomes ``null``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(json_ready(obj), indent=2) + "\n")
    os.replace(tmp, path)
    return path
