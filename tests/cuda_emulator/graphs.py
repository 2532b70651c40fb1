"""CUDA graph capture and replay emulated on the CPU, for a plan's workspaces.

Under :class:`EmulatedGraph` a plan's ``Workspaces`` believes its stream is capturing
(``_capturing`` is the per-call capture check); the captured calls run at once (the CPU runs
what the GPU would defer) and the workspaces made during the capture are the graph's.
``replay()`` runs the captured calls again as a graph replay does: the graph's zero-fills of
its workspaces first (captured with them: ``make()`` zeroes the tickets), then the same calls
on the same workspaces."""

from __future__ import annotations

from bnkernels.backends import plan as base


class EmulatedGraph:
    def __init__(self, workspaces_of, fn):
        """``workspaces_of``: the plans' Workspaces objects the calls use; ``fn()``: the
        captured calls (their outputs are returned by capture and replay)."""
        self.fn, self.spaces = fn, list(workspaces_of)
        self.made: list = []

    def capture(self):
        before = len(base.GRAPH_WORKSPACES)
        saved = [w._capturing for w in self.spaces]
        for w in self.spaces:
            w._capturing = lambda: True
        try:
            out = self.fn()
        finally:
            for w, c in zip(self.spaces, saved):
                w._capturing = c
        self.made = base.GRAPH_WORKSPACES[before:]
        return out

    def replay(self):
        for ws in self.made:  # the captured fills: the tickets back at zero
            tickets = ws[1] if isinstance(ws, tuple) else ws.ticket
            tickets.zero_()
        queue = list(self.made)
        saved = [w.get for w in self.spaces]
        for w in self.spaces:
            w.get = lambda: queue.pop(0)
        try:
            return self.fn()
        finally:
            for w, g in zip(self.spaces, saved):
                w.get = g
            assert not queue, "a replay used fewer workspaces than its capture made"
