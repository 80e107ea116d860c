"""CLI hook for `fam demo` and `fam eval` (temporary; the demo engineer replaces it).

fam/cli.py calls ``register(subparsers)``; it adds the demo's subcommands."""


def register(subparsers) -> None:
    return None
