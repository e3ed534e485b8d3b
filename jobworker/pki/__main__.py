"""``python -m jobworker.pki``: the same command as ``jobworker-certs``."""

import sys

from jobworker.pki.cli import main

sys.exit(main())
