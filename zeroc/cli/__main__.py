"""`python -m zeroc.cli ...`: the `zeroc` command."""

import sys

from zeroc.cli import main

sys.exit(main())
