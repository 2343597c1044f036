import sys

from bench.zoo.sweep import main

sys.exit(main())
