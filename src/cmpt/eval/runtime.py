"""Where an evaluation runs and where its results go (docs/method.md §5): the ``--device`` choice,
single-threaded probe heads on the CPU, and result files (``--out``: one JSON file, or a directory;
NaN written as ``null``).

**Result files never replace the user's files.** Every results JSON carries
``"cmpt": {"command": "eval COMMAND", "version": ...}`` (:data:`RESULT_MARKER`). Before anything
loads, an existing file at an output path is refused (one ``FileExistsError`` naming it and the fix)
unless it is empty or an earlier output of the same command, recognised from its content
(:func:`check_replaceable`): a results JSON with the marker, or without it (written before the
marker) with the command's own top-level keys; a predictions JSONL whose first row has the
prediction keys; a markdown report under the command's title; a PNG plot stamped
``Software: cmpt eval COMMAND``, or one beside a recognised results JSON of the same name.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from cmpt.hub import json_ready
from cmpt.io_atomic import atomic_file

__all__ = ["available_devices", "check_out_dir", "finish_result", "head_threads", "pick_device"]
__all__ += ["RESULT_MARKER", "check_replaceable", "png_metadata", "results_file", "write_json"]
__all__ += ["write_result"]

#: The key of the provenance object every results file carries (``{"command": "eval probe", ...}``).
RESULT_MARKER = "cmpt"
#: The top-level keys of each command's results JSON as written before :data:`RESULT_MARKER`.
_RESULT_KEYS = {
    "probe": {"top1", "setting", "grid", "n_val"},
    "seg": {"miou", "per_class_iou", "n_val"},
    "retrieval": {"i2t", "t2i", "mean_recall"},
    "vqa": {"score", "metric", "per_type", "n_records"},
    "resolution": {"data", "metric", "points"},
    "embed": {"mmeb", "pages", "n_embedded"},
}
#: The first row of a predictions JSONL (``cmpt eval vqa`` / ``resolution``) holds these keys.
_PREDICTION_KEYS = {"id", "question", "prediction", "answers"}
#: The first line of each command's markdown report.
_MD_TITLES = {"resolution": "# Resolution sweep", "embed": "# Embedding evaluation"}
_MAX_JSON_BYTES = 64 << 20  # a results file is far smaller: a bigger file is not one


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
    ends with a path separator or is an existing directory (``--out evals/`` writes inside it). An
    existing file there that is not an earlier result of ``command`` is refused
    (:func:`check_replaceable`): call this before anything loads."""
    if out is None:
        return None
    path = Path(out)
    if str(out).endswith(("/", os.sep)) or path.is_dir():
        path = path / f"{command}_results.json"
    check_replaceable(path, command)
    return path


def check_out_dir(out: str | os.PathLike | None, command: str, names: Sequence[str] = ()) -> None:
    """Refuse, before anything runs, an ``--out`` for a directory-writing command that is a file,
    or a directory holding one of the files ``names`` the command writes that is not an earlier
    output of it (:func:`check_replaceable`)."""
    if out is None:
        return
    if Path(out).exists() and not Path(out).is_dir():
        raise ValueError(
            f"--out {str(out)!r} is a file; `cmpt eval {command}` writes several files into a directory: "
            "pass a new or existing directory"
        )
    for name in names:
        check_replaceable(Path(out) / name, command)


def check_replaceable(path: str | os.PathLike, command: str) -> None:
    """Raise ``FileExistsError`` (``IsADirectoryError`` for a directory) when ``path`` exists and is
    not an empty file or an earlier output of ``cmpt eval command``, told by its content (the module
    docstring; the kind of file by its suffix: ``.jsonl``, ``.md``, ``.png``, else a results JSON)."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(
            f"--out: {path} is a directory, where `cmpt eval {command}` writes a file: choose another --out"
        )
    if not path.exists() or _earlier_output(path, command):
        return
    raise FileExistsError(
        f"--out: {path} exists and is not an earlier `cmpt eval {command}` result; cmpt does not "
        "replace it: move or remove it, or choose another --out"
    )


def _earlier_output(path: Path, command: str) -> bool:
    """Whether the existing file ``path`` is empty or was written by ``cmpt eval command``."""
    try:
        if path.stat().st_size == 0:
            return True
        suffix = path.suffix.lower()
        if suffix == ".png":
            return _stamped_png(path, command) or _results_json(path.with_suffix(".json"), command)
        if suffix in (".jsonl", ".md"):
            with path.open(encoding="utf-8") as fh:
                first = fh.readline(1 << 20)
            if suffix == ".md":
                return command in _MD_TITLES and first.startswith(_MD_TITLES[command])
            row = json.loads(first)
            return command in ("vqa", "resolution") and isinstance(row, dict) and set(row) >= _PREDICTION_KEYS
        return _results_json(path, command)
    except (OSError, UnicodeDecodeError, ValueError):  # unreadable, not text, not JSON: not ours
        return False


def _results_json(path: Path, command: str) -> bool:
    """Whether ``path`` is a results JSON of ``command``: its marker, else its known keys."""
    if not path.is_file() or path.stat().st_size > _MAX_JSON_BYTES:
        return False
    obj = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(obj, dict):
        return False
    if RESULT_MARKER in obj:
        marker = obj[RESULT_MARKER]
        return isinstance(marker, dict) and marker.get("command") == f"eval {command}"
    return _RESULT_KEYS.get(command, {None}) <= obj.keys()


def png_metadata(command: str) -> dict[str, str]:
    """The PNG text chunk that marks a plot as written by ``cmpt eval command`` (``savefig(metadata=)``)."""
    return {"Software": f"cmpt eval {command}"}


def _stamped_png(path: Path, command: str) -> bool:
    """Whether ``path`` is a PNG with :func:`png_metadata` of ``command``."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            text = getattr(im, "text", {}) if im.format == "PNG" else {}
    except Exception:  # not an image, a damaged or huge one: not a plot cmpt wrote
        return False
    return text.get("Software") == png_metadata(command)["Software"]


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


def finish_result(
    result: dict[str, Any], out: str | os.PathLike | None, command: str, **provenance: Any
) -> dict[str, Any]:
    """Add where the numbers came from (model, data) to ``result``; write it as the results JSON of
    ``cmpt eval command`` to ``out`` if given (:func:`write_result`)."""
    result.update(provenance)
    if out is not None:
        write_result(result, out, command)
    return result


def write_result(result: dict[str, Any], path: str | os.PathLike, command: str) -> Path:
    """Write ``result`` as the results JSON of ``cmpt eval command``, with :data:`RESULT_MARKER`
    (``{"command": "eval COMMAND", "version"}``) by which a later run recognises it."""
    from cmpt import __version__

    marker = {"command": f"eval {command}", "version": __version__}
    return write_json({**result, RESULT_MARKER: marker}, path)


def write_json(obj: Any, path: str | os.PathLike) -> Path:
    """Write ``obj`` as indented JSON, atomically (:func:`cmpt.io_atomic.atomic_file`); NaN becomes
    ``null``."""
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(json_ready(obj), indent=2) + "\n", encoding="utf-8")
    return Path(path)
