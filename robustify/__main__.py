import sys

from robustify.cli import main

sys.exit(main())
