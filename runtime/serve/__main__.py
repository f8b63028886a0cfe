"""python -m runtime.serve: see the package's docstring, or --help."""

import sys

from .startup import main

sys.exit(main())
