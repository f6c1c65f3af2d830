import sys

from edge_pfm.cli import main

sys.exit(main())
