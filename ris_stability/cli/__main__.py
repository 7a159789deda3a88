import sys

from ris_stability.cli.app import main

sys.exit(main())
