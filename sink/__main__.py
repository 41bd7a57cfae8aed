"""`python -m sink ...` is the console script `kafka-timescale-sink`."""

import sys

from sink.cli import main

sys.exit(main())
