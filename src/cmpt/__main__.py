"""`python -m cmpt ...` (and `torchrun -m cmpt ...`)."""

import sys

from .cli import main

sys.exit(main())
