"""Loading checkpoints without running code from them (docs/method.md §4 "Verified checkpoints").

A DCP checkpoint has two pickles that stock ``torch.distributed.checkpoint`` unpickles without
restriction: the ``.metadata`` file (``FileSystemReader.read_metadata``: ``pickle.load``) and the
non-tensor items of the state dict (``DefaultLoadPlanner.load_bytes``: ``torch.load(...,
weights_only=False)``). A crafted file in a run directory would then execute code on resume.

* :class:`SafeFileSystemReader` (a ``FileSystemReader``) reads ``.metadata`` through
  :func:`load_dcp_metadata`: a ``pickle.Unpickler`` whose ``find_class`` admits only DCP's
  metadata classes, ``torch.Size``, dtypes, the layout helper and paths; anything else raises
  :class:`UnsafeCheckpointError` naming the file and the refused global.
* :class:`SafeLoadPlanner` (a ``DefaultLoadPlanner``) unpickles the non-tensor items with
  ``torch.load(weights_only=True)`` (optimizer hyperparameters: numbers, strings, tuples, None).

Tensors themselves are already read by DCP with ``weights_only=True``.
"""

from __future__ import annotations

import contextlib
import io
import os
import pickle
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import CheckpointException, DefaultLoadPlanner, FileSystemReader
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

from .verify import CheckpointError

__all__ = ["SafeFileSystemReader", "SafeLoadPlanner", "UnsafeCheckpointError", "load_dcp_metadata"]
__all__ += ["safe_dcp_load"]

#: (module, name) pairs a DCP ``.metadata`` pickle may reference (torch 2.4 – 2.13 write only these).
_ALLOWED: frozenset[tuple[str, str]] = frozenset(
    [
        ("torch.distributed.checkpoint.metadata", n)
        for n in (
            "Metadata",
            "MetadataIndex",
            "StorageMeta",
            "TensorProperties",
            "TensorStorageMetadata",
            "BytesStorageMetadata",
            "ChunkStorageMetadata",
            "_MEM_FORMAT_ENCODING",
        )
    ]
    + [("torch.distributed.checkpoint.filesystem", n) for n in ("_StorageInfo", "_StoragePrefix")]
    + [("torch", "Size"), ("torch.serialization", "_get_layout")]
    + [("pathlib", n) for n in ("Path", "PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath")]
    + [("collections", "OrderedDict"), ("builtins", "set"), ("builtins", "frozenset")]
)


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint file asks to unpickle something other than checkpoint data (refused)."""


class _MetadataUnpickler(pickle.Unpickler):
    def __init__(self, file: Any, path: str) -> None:
        super().__init__(file)
        self._path = path

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise UnsafeCheckpointError(
            f"{self._path}: refused to unpickle {module}.{name} — a DCP .metadata file holds only "
            "checkpoint-metadata classes; this file was not written by torch.distributed.checkpoint "
            "(crafted or corrupt). Nothing from it was executed"
        )

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafeCheckpointError(f"{self._path}: refused a persistent id in DCP .metadata")


def load_dcp_metadata(path: str | os.PathLike) -> Metadata:
    """Unpickle a DCP ``.metadata`` file with :class:`_MetadataUnpickler`; the result must be a
    ``Metadata``. Raises :class:`UnsafeCheckpointError` (naming ``path``) for anything else,
    ``FileNotFoundError`` when it is missing."""
    with open(path, "rb") as f:
        try:
            md = _MetadataUnpickler(f, str(path)).load()
        except UnsafeCheckpointError:
            raise
        except (pickle.UnpicklingError, EOFError, AttributeError, TypeError, ValueError, IndexError) as e:
            what = f"{type(e).__name__}: {e}"
            raise UnsafeCheckpointError(f"{path}: DCP .metadata is corrupt ({what})") from None
    if not isinstance(md, Metadata):
        raise UnsafeCheckpointError(f"{path}: DCP .metadata holds a {type(md).__name__}, not a Metadata")
    return md


class SafeFileSystemReader(FileSystemReader):
    """``FileSystemReader`` that reads ``.metadata`` through :func:`load_dcp_metadata`."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        rank = kwargs.get("rank")
        name = ".metadata" if rank is None else f"__{rank}.metadata"
        metadata = load_dcp_metadata(Path(self.path) / name)
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class SafeLoadPlanner(DefaultLoadPlanner):
    """``DefaultLoadPlanner`` whose non-tensor items are unpickled with ``weights_only=True``."""

    def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
        obj = torch.load(value, weights_only=True)  # refuses anything but plain data
        # hand the vetted object to DCP's own placement logic, re-serialized from plain data only
        clean = io.BytesIO()
        torch.save(obj, clean)
        clean.seek(0)
        super().load_bytes(read_item, clean)


@contextlib.contextmanager
def quiet_dcp() -> Iterator[None]:
    """DCP warns on every single-process call ("torch.distributed is disabled"); that is intended here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
        yield


def safe_dcp_load(path: Path, state: dict[str, Any]) -> None:
    """``dcp.load`` of checkpoint ``path`` into ``state`` through the safe reader and planner; a
    failure is a :class:`CheckpointError` naming ``path`` (DCP's ``CheckpointException`` unwrapped)."""
    try:
        with quiet_dcp():
            dcp.load(state, storage_reader=SafeFileSystemReader(path), planner=SafeLoadPlanner())
    except CheckpointException as e:
        inner = next(iter(e.failures.values()))[0] if e.failures else e
        if isinstance(inner, CheckpointError):
            raise inner from None
        raise CheckpointError(f"checkpoint {path} could not be loaded: {inner!r}") from None
