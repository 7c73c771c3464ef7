"""Adaptive studies in rounds: which comparisons are still open, and which seeds come next.

    python -m study plan protocols/d2l-dropout.yaml --set "adaptive={round: 5}"
"""

from __future__ import annotations

from study.analysis import sequential as sq
from study.protocol.schema import Adaptive, Protocol


def design_for(protocol: Protocol) -> sq.Design:
    """The sequential design of a protocol: its alpha and margin, seeds.count as the first look,
    and its adaptive block (the defaults of `Adaptive` for a protocol without one)."""
    block = protocol.adaptive or Adaptive()
    count = protocol.seeds.count if protocol.seeds.count is not None else len(protocol.seeds.values())
    return sq.Design(alpha=protocol.analysis.alpha, margin=protocol.analysis.equivalence_margin,
                     start=count, round=block.round, max_seeds=max(block.max_seeds, count),
                     stop=block.stop)
