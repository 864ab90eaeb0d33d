"""Test helper: run train.py's command line several times in one interpreter (imports paid once).

    python tests/run_many.py ARGS [--next ARGS ...]
Each group of ARGS is one `python train.py ARGS`, run in order; the first that fails ends the
process with its exit code (2 and a one-line `error: ...` for a UserError, as train.py does).
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import config  # noqa: E402
import train  # noqa: E402
from utils.errors import run_cli  # noqa: E402


def split_groups(argv, sep="--next"):
    groups = [[]]
    for a in argv:
        if a == sep:
            groups.append([])
        else:
            groups[-1].append(a)
    return groups


if __name__ == "__main__":
    for group in split_groups(sys.argv[1:]):
        run_cli(lambda: train.main(config.parse_args(group)))
