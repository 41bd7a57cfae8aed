"""`python -m dlq ...` is the console script `sink-dlq`."""

import sys

from dlq.cli import main

sys.exit(main())
