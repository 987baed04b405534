"""`python -m langfuse_poller` is the `langfuse-poller` command."""

import sys

from .cli import main

sys.exit(main())
