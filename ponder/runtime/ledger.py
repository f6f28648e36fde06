"""The ledger: a JSON file of what reasoning spent, rewritten at every checkpoint.

Per tenant and tier: calls, prompt / cached / completion tokens, USD spent and USD reserved
for calls in flight; per budget: its cap, its current window's start, spent, reserved and
remaining. Written to a temporary file and renamed over the old one, so a reader never sees a
half-written ledger. Spend per tenant and tier is this process's since it started (a restarted
worker counts again from zero: the decisions on the output topic are the durable record); the
budgets' accounts are the partitions' own, restored with them.
"""

from __future__ import annotations

import datetime as _dt
import os
from pathlib import Path
from typing import TYPE_CHECKING

import msgspec

if TYPE_CHECKING:
    from ponder.operators.reason import Reasoner

__all__ = ["write_ledger"]


def write_ledger(path: str | Path, pipeline: str, reasoner: Reasoner) -> None:
    path = Path(path)
    doc = {"pipeline": pipeline, "updated": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
           "spend": reasoner.spend.rows(), "budgets": reasoner.budgets.state()}
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(msgspec.json.format(msgspec.json.encode(doc), indent=2) + b"\n")
    os.replace(tmp, path)
