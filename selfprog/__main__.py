import sys

from selfprog.cli import main

sys.exit(main())
