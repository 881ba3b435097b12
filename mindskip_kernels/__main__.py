"""`python -m mindskip_kernels <command>`: the same as the `mindskip` console script."""

import sys

from mindskip_kernels.cli import main

sys.exit(main())
