"""What the command-line tools (tools/*.py) share: flag parsing that exits 2 on a user error.

absl exits 1 when a flag does not parse; a config file that rejects its options (`configs/x.py:smok`)
or a bad `--config.x=` value is a user error, so the tools exit 2 with the one-line reason instead;
so is an override of a field the config lacks (ml_collections raises a bare AttributeError there).
"""
from __future__ import annotations

import sys

from absl import app, flags
from ml_collections import config_flags

from sgt_jax import config as config_lib


def _unknown_override(argv: list[str], default_spec: str | None = None) -> str | None:
    """The error line for the first `--config.a.b=v` whose field the `--config=` file (or the flag's
    default file) lacks; None when the overrides are not the problem."""
    spec = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), default_spec)
    try:
        if spec is None:
            default = flags.FLAGS["config"].default if "config" in flags.FLAGS else None
            cfg = default if hasattr(default, "keys") else config_lib.load_config(str(default))
        else:
            cfg = config_lib.load_config(spec)
    except Exception:  # noqa: BLE001 - the config's own error is reported by absl's path instead
        return None
    for a in argv:
        if a.startswith("--config.") and "=" in a:
            key, value = a[len("--config."):].split("=", 1)
            bad = config_lib.unknown_field(cfg, key, value)
            if bad:
                return bad
    return None


def _exit_unknown_field(prog: str, message: str) -> None:
    print(f"{prog}: invalid flags: {message}", file=sys.stderr)
    print("Pass --helpshort or --helpfull to see help on flags.", file=sys.stderr)
    sys.exit(2)


def define_config_file(name: str, default: str | None, help_string: str, **kwargs):
    """`config_flags.DEFINE_config_file`; with a default file, ml_collections applies the command
    line's `--config.x=` overrides at definition time, so an unknown field is reported here (exit 2)."""
    try:
        return config_flags.DEFINE_config_file(name, default, help_string, **kwargs)
    except (AttributeError, KeyError):
        bad = _unknown_override(sys.argv, default)
        if bad is None:
            raise
        _exit_unknown_field(sys.argv[0], bad)


def parse_flags(argv: list[str]) -> list[str]:
    """`app.run(main, flags_parser=cli.parse_flags)`: absl's parsing, exit code 2 on a bad flag."""
    try:
        return flags.FLAGS(argv)
    except (AttributeError, KeyError):  # ml_collections: an override names a field the config lacks
        bad = _unknown_override(argv)
        if bad is None:
            raise
        _exit_unknown_field(argv[0], bad)
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
