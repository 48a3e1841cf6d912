"""``python -m client_demo``: see client_demo.cli."""

import sys

from client_demo.cli import main

sys.exit(main())
