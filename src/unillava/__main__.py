"""`python -m unillava` runs the command line."""

import sys

from unillava.cli import main

sys.exit(main())
