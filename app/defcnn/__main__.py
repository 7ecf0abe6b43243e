"""`python -m defcnn`: the same command as the `defcnn` console script."""

import sys

from defcnn.cli import main

sys.exit(main())
