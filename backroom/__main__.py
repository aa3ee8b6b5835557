"""`python -m backroom` is the `backroom` command."""

import sys

from backroom.cli import main

sys.exit(main())
