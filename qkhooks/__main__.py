"""``python -m qkhooks`` (also ``torchrun -m qkhooks ...``) runs the command-line interface."""

import sys

from qkhooks.cli import main

sys.exit(main())
