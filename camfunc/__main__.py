"""``python -m camfunc``: the command line."""

import sys

from camfunc.cli import main

sys.exit(main())
