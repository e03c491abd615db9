import sys

from weatherkd.cli import main

sys.exit(main())
