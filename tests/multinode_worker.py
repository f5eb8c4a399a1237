"""``torchrun`` entry for tests/test_multinode.py: ``cmpt train ARGS...`` in which, on the elastic
agent's first attempt only, rank 1 stops after saving checkpoint ``STEP``, writes its pid to
``MARKER`` and waits there to be killed (the test sends it SIGKILL).

Usage: ``torchrun ... tests/multinode_worker.py MARKER STEP train RECIPE --set ...``.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from cmpt.cli import main
from cmpt.train.loop import Trainer

MARKER, STEP = Path(sys.argv[1]), int(sys.argv[2])
_save = Trainer._save


def _save_then_wait(self: Trainer, ckpt, elapsed_run: float) -> None:
    _save(self, ckpt, elapsed_run)
    first_attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"
    if first_attempt and self.world.rank == 1 and self.counters["step"] == STEP:
        MARKER.write_text(str(os.getpid()))
        while True:  # until the test kills this process
            time.sleep(1)


Trainer._save = _save_then_wait

if __name__ == "__main__":
    sys.exit(main(sys.argv[3:]))
