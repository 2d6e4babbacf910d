"""`python -m services.compress [--config PATH]`."""

import sys

from services.compress.server import main

sys.exit(main())
