"""`python -m vmimagemanager.cli`: the `vmimagemanager` command."""

import sys

from . import main

sys.exit(main())
