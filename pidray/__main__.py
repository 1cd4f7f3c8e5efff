import sys

from pidray.cli import main

sys.exit(main())
