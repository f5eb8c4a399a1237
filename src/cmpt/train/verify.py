"""Checkpoint manifests and their verification (docs/method.md §4 "Verified checkpoints").

The ``COMPLETE`` marker of ``step_NNNNNN/`` is a JSON manifest: the format, the step, the world
size and, for every file of the checkpoint, its size and CRC-32 (``zlib.crc32``, streamed in
16 MiB blocks; about 2 GB/s on one core — it detects every flipped bit and every burst of up to
32 bits, and any other damage with probability 1 - 2⁻³²). The checksum guards against *accidental*
damage (bad disks, truncated copies, a crash before the data reached the disk); deliberate
tampering is the job of the safe loaders of :mod:`cmpt.train.safe_load`.

:func:`verify_checkpoint` checks a directory offline: the manifest (every listed file present,
with its size and checksum), then the structure — ``trainer_state.json`` is a JSON object with a
world size, one ``rank_NNNNN.pt`` per rank, and the DCP ``.metadata`` loads with the restricted
unpickler and every data file it references is long enough. A marker that is a bare step number
comes from cmpt before manifests ("legacy"): it cannot be verified, only the structure is checked,
and it is accepted with a warning (refusing it would strand every run started before).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import datetime as _dt
import json
import os
import re
import zlib
from collections.abc import Iterable
from pathlib import Path
from typing import Any

__all__ = ["MANIFEST_FORMAT", "MARKER", "CheckpointError", "CheckpointSaveError", "Verdict"]
__all__ += ["checksum_files", "dir_nbytes", "file_crc32", "read_manifest", "verify_checkpoint"]
__all__ += ["quarantine", "set_aside_note", "step_dirs", "verify_final", "verify_run", "write_manifest"]

MARKER = "COMPLETE"
MANIFEST_FORMAT = "cmpt-checkpoint-manifest/1"
DAMAGED_SUFFIX = ".damaged"
_BLOCK = 16 << 20
_STEP_DIR = re.compile(r"^step_(\d+)$")
_RANK_FILE = "rank_{:05d}.pt"


class CheckpointError(OSError):
    """A checkpoint that cannot be used or written; the message names it and says why."""


class CheckpointSaveError(CheckpointError):
    """Writing a checkpoint failed (disk full, I/O error); the previous checkpoint is intact."""


class _Damaged(Exception):
    """Internal: one reason a checkpoint is unusable (turned into a :class:`Verdict`)."""


@dataclasses.dataclass(frozen=True)
class Verdict:
    """The outcome of :func:`verify_checkpoint`: ``ok`` and a one-line ``reason`` ("ok", "legacy
    ...", or what is wrong and in which file); ``nbytes``: the files' total size."""

    path: Path
    ok: bool
    reason: str
    legacy: bool = False
    nbytes: int = 0
    label: str = ""  # overrides "ok" / "DAMAGED" in :meth:`line`

    def line(self) -> str:
        return f"{self.path.name}: {self.label or ('ok' if self.ok else 'DAMAGED')} ({self.reason})"


def file_crc32(path: str | os.PathLike) -> tuple[int, str]:
    """``(size, crc32 as 8 hex digits)`` of a file, read in 16 MiB blocks (zlib releases the GIL)."""
    crc, size = 0, 0
    buf = bytearray(_BLOCK)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            crc = zlib.crc32(view[:n], crc)
            size += n
    return size, f"{crc & 0xFFFFFFFF:08x}"


def checksum_files(directory: Path, names: Iterable[str], workers: int = 4) -> dict[str, list]:
    """``{name: [size, crc32]}`` for files of ``directory``, hashed by up to ``workers`` threads."""
    names = sorted(set(names))
    if not names:
        return {}
    with concurrent.futures.ThreadPoolExecutor(max(1, min(workers, len(names)))) as pool:
        results = pool.map(lambda n: file_crc32(directory / n), names)
        return {n: list(r) for n, r in zip(names, results)}


def write_manifest(directory: Path, step: int, world_size: int, files: dict[str, list]) -> int:
    """Write the ``COMPLETE`` marker with the manifest of ``files`` (from :func:`checksum_files`)
    and fsync it; returns the checkpoint's total size in bytes."""
    head = {"format": MANIFEST_FORMAT, "step": step, "world_size": world_size, "checksum": "crc32"}
    body = ",\n".join(f"  {json.dumps(n)}: {json.dumps(list(v))}" for n, v in sorted(files.items()))
    text = json.dumps(head)[:-1] + ', "files": {\n' + body + "\n}}\n"  # one line per file
    path = directory / MARKER
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    return sum(int(v[0]) for v in files.values())


def read_manifest(directory: Path) -> dict[str, Any] | None:
    """The manifest of ``directory``'s marker; ``None`` for a legacy marker (a bare step number).
    Raises :class:`_Damaged` when the marker is missing, unreadable or malformed."""
    path = directory / MARKER
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise _Damaged(f"no {MARKER} marker (interrupted save)") from None
    except (OSError, UnicodeDecodeError) as e:
        raise _Damaged(f"{MARKER} marker unreadable ({e})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise _Damaged(f"{MARKER} manifest is not valid JSON ({e})") from None
    if isinstance(data, int) and not isinstance(data, bool):
        return None
    files = data.get("files") if isinstance(data, dict) else None
    if not isinstance(data, dict) or data.get("format") != MANIFEST_FORMAT or not isinstance(files, dict):
        raise _Damaged(f"{MARKER} manifest has an unknown layout (format {_get(data, 'format')!r})")
    _check_entries(files, MARKER)
    return data


def _check_entries(files: dict, where: str) -> None:
    for name, entry in files.items():
        if not _plain_name(name):
            raise _Damaged(f"{where} manifest lists an unsafe file name {name!r}")
        ok = isinstance(entry, list) and len(entry) == 2 and isinstance(entry[0], int)
        if not ok or not isinstance(entry[1], str):
            raise _Damaged(f"{where} manifest entry for {name} is malformed: {entry!r}")


def _get(data: Any, key: str) -> Any:
    return data.get(key) if isinstance(data, dict) else None


def _plain_name(name: Any) -> bool:
    return isinstance(name, str) and name not in ("", ".", "..") and "/" not in name and "\\" not in name


def _check_manifest(path: Path, manifest: dict[str, Any], checksums: bool, workers: int) -> int:
    files: dict[str, list] = manifest["files"]
    for name, (size, _) in sorted(files.items()):
        try:
            actual = (path / name).stat().st_size
        except FileNotFoundError:
            raise _Damaged(f"missing file {name} (listed in the manifest)") from None
        if actual != size:
            raise _Damaged(f"size mismatch in {name}: {actual} bytes, the manifest says {size}")
    if checksums:
        try:
            found = checksum_files(path, files, workers)
        except OSError as e:
            raise _Damaged(f"unreadable file ({e})") from None
        for name, (_, crc) in sorted(files.items()):
            if found[name][1] != crc:
                raise _Damaged(
                    f"checksum mismatch in {name}: crc32 {found[name][1]}, the manifest says {crc}"
                )
    return sum(size for size, _ in files.values())


def _check_structure(path: Path, manifest: dict[str, Any] | None) -> None:
    from .safe_load import UnsafeCheckpointError, load_dcp_metadata

    try:
        state = json.loads((path / "trainer_state.json").read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise _Damaged("missing file trainer_state.json") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _Damaged(f"trainer_state.json is unreadable JSON ({e})") from None
    world = _get(state, "world_size")
    if not isinstance(world, int) or world < 1:
        raise _Damaged(f"trainer_state.json has no valid world_size (got {world!r})")
    if manifest is not None and manifest.get("world_size") != world:
        raise _Damaged(f"trainer_state.json says {world} ranks, the manifest {manifest.get('world_size')}")
    for r in range(world):
        if not (path / _RANK_FILE.format(r)).is_file():
            raise _Damaged(f"missing file {_RANK_FILE.format(r)} (written by {world} ranks)")
    try:
        metadata = load_dcp_metadata(path / ".metadata")
    except FileNotFoundError:
        raise _Damaged("missing file .metadata (DCP metadata)") from None
    except UnsafeCheckpointError as e:
        raise _Damaged(str(e)) from None
    needed: dict[str, int] = {}
    for info in (getattr(metadata, "storage_data", None) or {}).values():
        name = getattr(info, "relative_path", None)
        end = getattr(info, "offset", 0) + getattr(info, "length", 0)
        if not _plain_name(name):
            raise _Damaged(f".metadata references an unsafe data file name {name!r}")
        needed[name] = max(needed.get(name, 0), end)
    for name, end in sorted(needed.items()):
        try:
            size = (path / name).stat().st_size
        except FileNotFoundError:
            raise _Damaged(f"missing file {name} (referenced by .metadata)") from None
        if size < end:
            raise _Damaged(f"{name} is truncated: {size} bytes, .metadata needs {end}")


def verify_checkpoint(path: str | os.PathLike, checksums: bool = True, workers: int = 4) -> Verdict:
    """Verify one checkpoint directory offline (see the module docstring); never raises for damage."""
    path = Path(path)
    try:
        if not path.is_dir():
            raise _Damaged("not a directory")
        manifest = read_manifest(path)
        nbytes = _check_manifest(path, manifest, checksums, workers) if manifest is not None else 0
        _check_structure(path, manifest)
    except _Damaged as e:
        return Verdict(path, False, str(e))
    except OSError as e:  # e.g. EIO while reading: unusable all the same
        return Verdict(path, False, f"I/O error ({e})")
    if manifest is None:
        nbytes = dir_nbytes(path)
        return Verdict(path, True, "legacy: no manifest, structure only", legacy=True, nbytes=nbytes)
    return Verdict(path, True, f"{len(manifest['files'])} files, {nbytes} bytes verified", nbytes=nbytes)


def dir_nbytes(path: Path) -> int:
    """Total size of the regular files directly in ``path`` (0 when it cannot be listed)."""
    try:
        return sum(e.stat().st_size for e in os.scandir(path) if e.is_file(follow_symlinks=False))
    except OSError:
        return 0


def quarantine(path: Path) -> Path | None:
    """Rename a damaged checkpoint to ``<name>.damaged`` (``.damaged2``, ... when taken)."""
    for i in range(1, 100):
        target = path.with_name(path.name + DAMAGED_SUFFIX + ("" if i == 1 else str(i)))
        if not target.exists():
            try:
                os.replace(path, target)
            except OSError:
                return None
            return target
    return None


def set_aside_note(path: str | os.PathLike) -> str | None:
    """Why checkpoint ``path`` is not there, when a start set it aside (:func:`quarantine`: found
    damaged, or without its marker; docs/method.md §4 "Verified checkpoints"): one clause naming the
    ``.damaged`` copy, when it was renamed (its change time) and ``cmpt ckpt verify``, which says
    what is wrong with it. None when ``path`` exists or has no such copy."""
    p = Path(path)
    if p.exists() or not p.parent.is_dir():
        return None
    copy = re.compile(rf"^{re.escape(p.name)}{re.escape(DAMAGED_SUFFIX)}\d*$")
    found = [q for q in p.parent.iterdir() if copy.match(q.name) and q.is_dir()]
    if not found:
        return None
    newest = max(found, key=lambda q: q.stat().st_ctime)
    when = _dt.datetime.fromtimestamp(newest.stat().st_ctime).astimezone().isoformat(timespec="seconds")
    return (
        f"{p} was set aside as {newest.name} by a training start that found it damaged or incomplete "
        f"(renamed {when}); `cmpt ckpt verify {p.parent.parent}` says why"
    )


def step_dirs(root: Path) -> list[tuple[int, Path]]:
    """``step_NNNNNN`` directories under ``root`` (complete or not), oldest first."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir()]
    return sorted(found)


def verify_run(run_dir: str | os.PathLike) -> tuple[list[Verdict], bool]:
    """Verify every checkpoint of a run (``checkpoints/step_*``, quarantined ``*.damaged`` ones,
        ``final/`` when it holds a marker), oldest first; returns the verdicts and whether the run is
        usable: its newest complete checkpoint is good (legacy accepted) and ``final/``, if marked,
        is too. Directories without a marker are listed as incomplete (a resume sets them aside as
    ``*.damaged``; it removes only interrupted ``step_N.tmp`` saves)."""
    run_dir = Path(run_dir)
    root = run_dir / "checkpoints"
    verdicts, marked = [], []
    for _, p in step_dirs(root):
        if (p / MARKER).is_file():
            marked.append(verify_checkpoint(p))
            verdicts.append(marked[-1])
        else:
            verdicts.append(Verdict(p, False, f"no {MARKER} marker, set aside on resume", label="incomplete"))
    good = bool(marked) and marked[-1].ok
    if root.is_dir():
        for p in sorted(root.iterdir()):
            if p.is_dir() and re.fullmatch(r"step_\d+\.tmp", p.name):
                verdicts.append(Verdict(p, False, "interrupted save, removed on resume", label="incomplete"))
            elif p.is_dir() and p.name.endswith(DAMAGED_SUFFIX):
                reason = verify_checkpoint(p).reason
                verdicts.append(Verdict(p, False, f"set aside by a resume: {reason}", label="quarantined"))
    final = run_dir / "final"
    if final.is_dir() and any((final / m).is_file() for m in (MARKER, *_OUTPUT_MARKERS)):
        verdict = verify_final(final)
        verdicts.append(verdict)
        good = good and verdict.ok
    return verdicts, good


#: the markers of :mod:`cmpt.io_atomic` output directories (complete, in progress)
_OUTPUT_MARKERS = (".cmpt-complete.json", ".cmpt-writing.json")


def verify_final(path: Path) -> Verdict:
    """An output directory (``final/``): in progress or interrupted when it holds the writing
    marker; checked against a manifest when its marker (``COMPLETE``, or the ``files`` of
    ``.cmpt-complete.json``) has one; otherwise accepted on its completion marker alone."""
    complete, writing = (path / m for m in _OUTPUT_MARKERS)
    if writing.exists():
        return Verdict(path, False, f"incomplete: {writing.name} present (being written or interrupted)")
    try:
        if (path / MARKER).is_file():
            manifest = read_manifest(path)
        else:
            info = json.loads(complete.read_text(encoding="utf-8"))
            if not isinstance(info, dict):
                raise _Damaged(f"{complete.name} does not hold a JSON object")
            manifest = {"files": info["files"]} if isinstance(info.get("files"), dict) else None
            if manifest is not None:
                _check_entries(manifest["files"], complete.name)
        if manifest is None:
            return Verdict(path, True, "completion marker, no checksums to verify", legacy=True)
        nbytes = _check_manifest(path, manifest, True, 4)
    except _Damaged as e:
        return Verdict(path, False, str(e))
    except json.JSONDecodeError as e:
        return Verdict(path, False, f"{complete.name} is not valid JSON ({e})")
    except OSError as e:
        return Verdict(path, False, f"I/O error ({e})")
    return Verdict(path, True, f"{len(manifest['files'])} files, {nbytes} bytes verified", nbytes=nbytes)
