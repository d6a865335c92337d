"""``python -m seqapps`` = the ``seqapps`` command."""

import sys

from seqapps.cli import main

sys.exit(main())
