"""Train the embedded demo model (see fam_demo/train.py and docs/demo.md)."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fam_demo.train import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main())
