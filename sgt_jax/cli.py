"""What the command-line tools (tools/*.py) share: flag parsing that exits 2 on a user error.

absl exits 1 when a flag does not parse; a config file that rejects its options (`configs/x.py:smok`)
or a bad `--config.x=` value is a user error, so the tools exit 2 with the one-line reason instead.
"""
from __future__ import annotations

import sys

from absl import app, flags


def parse_flags(argv: list[str]) -> list[str]:
    """`app.run(main, flags_parser=cli.parse_flags)`: absl's parsing, exit code 2 on a bad flag."""
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        # A config file's own error arrives wrapped in config_flags' traceback text: keep its line.
        lines = [line.strip() for line in str(e).splitlines() if "ConfigError:" in line]
        if lines:
            print(f"{argv[0]}: invalid config: {lines[-1].split('ConfigError:', 1)[1].strip()}", file=sys.stderr)
        else:
            print(f"{argv[0]}: invalid flags: {e}", file=sys.stderr)
        print("Pass --helpshort or --helpfull to see help on flags.", file=sys.stderr)
        sys.exit(2)


def run(main) -> None:
    app.run(main, flags_parser=parse_flags)
