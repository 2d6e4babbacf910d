"""`python -m tokenmill.services.ingest [--config PATH]`."""

import sys

from tokenmill.services.ingest.server import main

if __name__ == "__main__":  # spawned pipeline workers import this module too; they must not serve
    sys.exit(main())
