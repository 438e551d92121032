"""``python -m tensorsnap``: the same as the ``tensorsnap`` command."""

import sys

from ._cli import main

if __name__ == "__main__":
    sys.exit(main())
