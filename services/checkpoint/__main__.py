"""`python -m services.checkpoint [--config PATH]`."""

import sys

from services.checkpoint.server import main

sys.exit(main())
