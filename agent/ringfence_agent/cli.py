"""ringfence-agent command line (placeholder until the agent lands)."""

import sys


def main(argv: list[str] | None = None) -> int:
    print("ringfence-agent: not built yet", file=sys.stderr)
    return 2
