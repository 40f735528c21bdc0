import sys

from stdet.cli import main

sys.exit(main())
