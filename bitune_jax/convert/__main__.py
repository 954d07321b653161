"""`python -m bitune_jax.convert SRC DST --arch ARCH`."""

import sys

from bitune_jax.convert.cli import main

sys.exit(main())
