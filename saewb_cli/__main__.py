import sys

from saewb_cli import main

sys.exit(main())
