"""``python -m fam ...`` = the ``fam`` command (what ``torchrun -m fam batch ...`` and
``accelerate launch -m fam batch ...`` run)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
