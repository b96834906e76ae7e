"""``python -m fusedce``: the ``fusedce`` command line (:mod:`fusedce.cli`)."""

import sys

from .cli import main

sys.exit(main())
