import sys

from pascaline.cli import main

sys.exit(main())
