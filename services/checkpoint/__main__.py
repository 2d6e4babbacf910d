"""`python -m tokenmill.services.checkpoint [--config PATH]`."""

import sys

from tokenmill.services.checkpoint.server import main

sys.exit(main())
