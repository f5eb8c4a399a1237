"""Exit codes of ``cmpt train``, the same under one process and several, and a torchrun wrapper.

======  =====================================================================================
code    meaning
======  =====================================================================================
0       finished: ``train.steps`` reached, ``final/`` written
75      stopped on SIGTERM / SIGINT after saving a checkpoint: rerun the command to resume
        (``EX_TEMPFAIL``)
2       user error: config, resume rules, input files, data (bad-sample limit), non-finite
        losses past ``train.max_nonfinite``
1       anything else (a bug, a crash, a second SIGINT, a worker killed)
======  =====================================================================================

The run's ``summary.json`` records the code (:class:`cmpt.train.Trainer`). Stock ``torchrun``
exits 1 whenever it is itself signalled or any worker exits non-zero, whatever the workers
reported; ``python -m cmpt.launch`` takes torchrun's arguments, runs torchrun's launcher and exits
with the workers' code instead (``cmpt train --nproc-per-node N`` uses it): each worker writes its
code to ``$CMPT_EXIT_DIR/rank_<RANK>``, and the launcher returns the most severe (1 > 2 > 75 > 0;
a worker that wrote none counts as 1). When signalled, it forwards the signal and waits
``--shutdown-timeout`` seconds (default here 600, torchrun's 30) for the workers to finish their
step and save a checkpoint before killing them.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path

__all__ = ["EXIT_FAILED", "EXIT_OK", "EXIT_RESUMABLE", "EXIT_USAGE", "combine_codes", "exit_code_for"]
__all__ += ["main", "report_exit"]

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_RESUMABLE = 0, 1, 2, 75
EXIT_DIR_ENV = "CMPT_EXIT_DIR"
SHUTDOWN_TIMEOUT_S = 600  # default --shutdown-timeout (torchrun's: 30 s, then SIGKILL)
_SEVERITY = (EXIT_FAILED, EXIT_USAGE, EXIT_RESUMABLE, EXIT_OK)


def exit_code_for(exc: BaseException) -> int:
    """2 for errors about the user's input, data, files or run (not bugs in cmpt), else 1."""
    from .train.bad_data import BadDataError
    from .train.loop import NonFiniteError

    if isinstance(exc, (BadDataError, NonFiniteError)):
        return EXIT_USAGE
    if isinstance(exc, (ValueError, OSError)) and not isinstance(exc, RuntimeError):
        return EXIT_USAGE
    return EXIT_FAILED


def combine_codes(codes: Iterable[int | None]) -> int:
    """The job's code from its workers' (None: the worker reported nothing, i.e. it died; a code that
    cmpt's workers never write counts as a failure too)."""
    codes = [EXIT_FAILED if c is None or int(c) not in _SEVERITY else int(c) for c in codes]
    for code in _SEVERITY:
        if code in codes:
            return code
    return EXIT_FAILED if codes else EXIT_OK


def report_exit(code: int) -> None:
    """Under :func:`main`, leave this worker's exit code for the launcher (no-op otherwise)."""
    d = os.environ.get(EXIT_DIR_ENV)
    if d:
        with contextlib.suppress(OSError):
            Path(d, f"rank_{int(os.environ.get('RANK', '0')):05d}").write_text(f"{code}\n")


def _read_code(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m cmpt.launch [torchrun options] script|-m module args``: torchrun, with the
    workers' exit code (module docstring)."""
    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    args = torchrun.parse_args(list(sys.argv[1:] if argv is None else argv))
    if getattr(args, "shutdown_timeout", 0) is None and not os.environ.get("TORCH_ELASTIC_SHUTDOWN_TIMEOUT"):
        args.shutdown_timeout = SHUTDOWN_TIMEOUT_S  # a signalled worker finishes its step and saves
    exit_dir = Path(tempfile.mkdtemp(prefix="cmpt-exit-"))
    previous = os.environ.get(EXIT_DIR_ENV)
    os.environ[EXIT_DIR_ENV] = str(exit_dir)
    try:
        try:
            torchrun.run(args)
        except (ChildFailedError, SignalException) as e:
            print(f"cmpt.launch: {type(e).__name__}: {str(e).strip().splitlines()[0]}", file=sys.stderr)
        except UnboundLocalError as e:
            # torch's elastic metrics wrapper hit by the signal before its first assignment raises
            # this while handling the SignalException: the workers' codes still tell the outcome
            if not isinstance(e.__context__, SignalException):
                raise
            print(f"cmpt.launch: SignalException: {str(e.__context__).strip()}", file=sys.stderr)
        files = sorted(exit_dir.glob("rank_*"))  # this node's workers (RANK is global)
        codes = [_read_code(f) for f in files]
        local = str(args.nproc_per_node)
        codes += [None] * max(0, (int(local) if local.isdigit() else len(files)) - len(codes))
        return combine_codes(codes)
    finally:
        if previous is None:
            os.environ.pop(EXIT_DIR_ENV, None)
        else:
            os.environ[EXIT_DIR_ENV] = previous
        shutil.rmtree(exit_dir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
