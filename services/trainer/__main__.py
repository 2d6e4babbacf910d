"""`python -m services.trainer [--config PATH]`."""

import sys

from services.trainer.server import main

sys.exit(main())
