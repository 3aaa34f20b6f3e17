"""Runs every rank of one launch at once from inside another command (a thin-link network namespace).

    unshare --net sh -c '<rate-limit lo> && exec "$@"' thin-link python -m benchmarks.ranks 2 python -m recipes...

All ranks must share one namespace, so the namespace's command starts them (as :func:`benchmarks.harness.run_ranks`
does elsewhere); the exit status is the first failing rank's.
"""

from __future__ import annotations

import os
import sys

from benchmarks import harness


def main(argv: list[str]) -> int:
    if len(argv) < 2 or not argv[0].isdigit():
        sys.stderr.write("usage: python -m benchmarks.ranks PROCESSES COMMAND...\n")
        return 2
    status, errors = harness.run_ranks(argv[1:], int(argv[0]), dict(os.environ))
    if status != 0:
        sys.stderr.write(errors)
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
