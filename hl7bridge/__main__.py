import sys

from hl7bridge.cli import main

sys.exit(main())
