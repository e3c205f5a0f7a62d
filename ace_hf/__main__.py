"""`python -m ace_hf SUBCOMMAND ...` (and `accelerate launch -m ace_hf SUBCOMMAND ...`): the `ace-hf` command."""

import sys

from .commands import main

sys.exit(main())
