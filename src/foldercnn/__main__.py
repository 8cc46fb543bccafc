"""`python -m foldercnn ...` (and `torchrun -m foldercnn ...`) is the `foldercnn` command."""

import sys

from .cli import main

sys.exit(main())
