"""When the server's prompt lookup verifies drafts: only where the expected tokens per second beat a plain step.

A verify forward at width w costs costs[w] (seconds, measured at warm-up; w = 0 is the plain step) for every
slot, while only the slots that drafted gain: a step at width w is expected to make
    active + drafting * gains[w]
tokens, where gains[w] is the mean of the drafts a drafting slot kept at that width (an exponential average,
starting at w, so each width is tried). The gate allows the width with the best expected tokens per second.
On a CPU a batch's verify costs several decode steps (benchmarks/RESULTS.md, Serving), so a full batch of chat
rarely pays; on an accelerator a verify costs about one step and drafts nearly always pay. While the gate keeps
to plain steps, every EXPLORE_EVERY-th step with drafting slots verifies anyway, so the gains stay current.
"""

from __future__ import annotations

import dataclasses

EXPLORE_EVERY = 16
SMOOTHING = 0.25  # weight of the newest step in gains


@dataclasses.dataclass
class WidthGate:
    """The widest verify width each step may take (process 0's; the plan carries it to the other processes)."""

    costs: dict[int, float]  # width -> seconds of one step at it; 0 must be there
    gains: dict[int, float] = dataclasses.field(default_factory=dict)
    drafting: int = 0  # slots that drafted at the latest step: the estimate for the next
    held_back: int = 0  # steps in a row the gate kept to plain while slots were drafting

    def __post_init__(self):
        self.gains = {w: float(w) for w in self.costs if w} | self.gains

    def max_width(self, active: int) -> int:
        """The widest width allowed for the next step with `active` decoding slots."""
        widths = sorted(self.costs)
        best = max(widths, key=lambda w: ((active + self.drafting * self.gains.get(w, 0.0)) / self.costs[w], -w))
        if best == 0 and self.drafting:
            self.held_back += 1
            if self.held_back >= EXPLORE_EVERY:
                self.held_back = 0
                return widths[-1]
        elif best:
            self.held_back = 0
        return best

    def observe(self, width: int, drafting: int, kept: int) -> None:
        """After a step at `width` in which `drafting` slots drafted and kept `kept` drafts in all."""
        self.drafting = drafting
        if width and drafting:
            self.gains[width] += SMOOTHING * (kept / drafting - self.gains[width])
