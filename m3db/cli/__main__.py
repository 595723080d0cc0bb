"""`python -m m3db.cli ...`: the same as the `m3db` command."""

import sys

from .main import main

sys.exit(main())
