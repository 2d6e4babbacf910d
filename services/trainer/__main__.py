"""`python -m tokenmill.services.trainer [--config PATH]`."""

import sys

from tokenmill.services.trainer.server import main

sys.exit(main())
