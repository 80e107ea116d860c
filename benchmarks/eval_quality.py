"""Quality evaluation of the FAM ablation on the embedded demo model.

Same implementation as ``fam eval`` (fam_demo/evaluation.py); writes quality.csv and
quality.md into --out, by default benchmarks/results/local/ (git-ignored); the
committed results are written with --out benchmarks/results.

    python benchmarks/eval_quality.py            # default set (8 prompts x 3 seeds)
    python benchmarks/eval_quality.py --quick    # 4 prompts x 1 seed, 2x2 and 4x4
"""

import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks.common import DEFAULT_OUT  # noqa: E402
from fam.cli import CLIError  # noqa: E402
from fam_demo.commands import add_eval_arguments, cmd_eval  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_eval_arguments(p, default_out=DEFAULT_OUT)
    try:
        return cmd_eval(p.parse_args(argv))
    except CLIError as error:
        print(f"eval_quality: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
