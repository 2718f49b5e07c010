"""Counting what torch.compile did, so that a compiled figure can be shown to have really run compiled.

torch's own counters (``torch._dynamo.utils.counters``): ``graph_break`` counts every graph break by reason, and
``stats/unique_graphs`` every graph dynamo produced. Compiled decoding traces one frame (the model's call) into one
graph, so a second graph for that frame is a recompilation.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class CompileCounts:
    """Graph breaks and graphs produced since :meth:`start` (after ``torch._dynamo.reset()``)."""

    graph_breaks: int = 0
    graphs: int = 0

    @property
    def recompiles(self) -> int:
        """Graphs beyond the first: recompilations of the one compiled frame."""
        return max(0, self.graphs - 1)

    @staticmethod
    def start() -> None:
        """Forget earlier compilations and counters (the next compiled call compiles afresh)."""
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()

    @classmethod
    def read(cls) -> CompileCounts:
        counters = torch._dynamo.utils.counters
        return cls(graph_breaks=int(sum(counters["graph_break"].values())),
                   graphs=int(counters["stats"]["unique_graphs"]))


__all__ = ["CompileCounts"]
