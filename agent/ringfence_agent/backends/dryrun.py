"""dry-run: prints what the nftables backend would do; touches nothing."""

from __future__ import annotations

import sys
from typing import TextIO

from ringfence_agent.backends import ElementChange, Observation
from ringfence_agent.backends.nft import NftRenderer
from ringfence_agent.plan import Plan


class DryRunBackend(NftRenderer):
    name = "dry-run"

    def __init__(self, out: TextIO | None = None) -> None:
        super().__init__()
        self.out = out or sys.stdout

    def apply(self, plan: Plan) -> None:
        self.out.write(f"# dry-run: would run `nft -f -` with:\n{self.render(plan)}")

    def apply_delta(self, change: ElementChange) -> None:
        self.out.write(f"# dry-run: would run `nft -f -` with:\n{self.render_delta(change)}")

    def flush(self) -> bool:
        self.out.write("# dry-run: would run `nft delete table inet ringfence`\n")
        return False

    def observe(self, plan: Plan, previous: dict[str, int]) -> Observation:
        return Observation()
