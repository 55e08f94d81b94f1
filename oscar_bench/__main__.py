import sys

from oscar_bench.cli import main

sys.exit(main())
