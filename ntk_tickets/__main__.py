"""``python -m ntk_tickets`` runs the command line."""

import sys

from ntk_tickets.cli import main

sys.exit(main())
