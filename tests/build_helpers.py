"""Helpers for build tests: a monitor that records progress and cancels on request."""
from __future__ import annotations

from dataclasses import dataclass, field

from kvclip.cache_builder.progress import CallbackMonitor


@dataclass
class ProgressLog:
    """Records every (step, done, total) report; can ask the build to stop.

    `cancel_at=(step, done)`: cancelled() turns true once `step` has reported `done` units.
    """

    cancel_at: tuple[str, int] | None = None
    events: list[tuple[str, int, int]] = field(default_factory=list)
    cancel_requested: bool = False

    def monitor(self) -> CallbackMonitor:
        return CallbackMonitor(on_progress=self.record, cancelled=lambda: self.cancel_requested)

    def record(self, step: str, done: int, total: int) -> None:
        self.events.append((step, done, total))
        if self.cancel_at is not None and (step, done) == self.cancel_at:
            self.cancel_requested = True

    def steps(self) -> list[str]:
        """Step names in the order they started (each start reports done = 0)."""
        order = []
        for step, _, _ in self.events:
            if not order or order[-1] != step:
                order.append(step)
        return order

    def last(self, step: str) -> tuple[int, int]:
        """(done, total) of the step's last report."""
        return [(d, t) for s, d, t in self.events if s == step][-1]

    def check_bounds(self) -> None:
        """done never exceeds a known total, never decreases within a step, starts at 0."""
        previous: dict[str, int] = {}
        for step, done, total in self.events:
            assert done >= 0 and total >= 0
            assert total == 0 or done <= total, (step, done, total)
            if step in previous:
                assert done >= previous[step], (step, done, previous[step])
            else:
                assert done == 0, (step, done)
            previous[step] = done
