"""`python -m app` runs the `fmnist` CLI."""

import sys

from app.cli import main

sys.exit(main())
