import sys

from pascaline._entry import main

sys.exit(main())
