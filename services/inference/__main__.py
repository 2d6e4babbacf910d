import sys

from services.inference.server import main

sys.exit(main())
