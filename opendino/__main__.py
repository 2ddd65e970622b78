"""`python -m opendino ...` (and `torchrun -m opendino ...`): the same as the `opendino` command."""

import sys

from opendino.cli import main

sys.exit(main())
