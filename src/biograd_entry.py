"""Entry point of the ``biograd`` console command, outside the ``biograd`` package so that a
Ctrl-C while the package (and torch) import ends with one line and status 130, like a Ctrl-C at
any later moment (``biograd.cli.main`` handles those)."""

from __future__ import annotations

import os
import sys


def main() -> int:
    """Import and run ``biograd.cli.main``; status 130 for a Ctrl-C during the import."""
    try:
        from biograd.cli import main as cli_main
    except KeyboardInterrupt:
        if os.environ.get("BIOGRAD_DEBUG", "") not in ("", "0"):
            raise
        print("biograd: interrupted", file=sys.stderr)
        return 130
    return cli_main()


if __name__ == "__main__":
    sys.exit(main())
