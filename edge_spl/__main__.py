import sys

from edge_spl.cli import main

sys.exit(main())
