"""`python -m tokenmill.services.compress [--config PATH]`."""

import sys

from tokenmill.services.compress.server import main

sys.exit(main())
