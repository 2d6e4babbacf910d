import sys

from tokenmill.services.inference.server import main

sys.exit(main())
