"""Progress and cancellation hooks of a build, for callers that run builds as jobs.

`build_cache` announces each step with `step(name, total)`, reports finished units with
`advance(n)` and calls `check()` between encoder batches and between steps, never once
publishing has started (publishing is atomic: a cancelled build publishes nothing).
Steps, in order, where they apply: reading, pseudo-labelling, text, captioning, synthesizing, encoding,
caption-keys, tuning, indexing, publishing (docs/architecture.md).
"""
from __future__ import annotations

from collections.abc import Callable

from kvclip.errors import KvclipError

STEPS: tuple[str, ...] = (
    "reading", "pseudo-labelling", "text", "captioning", "synthesizing", "encoding", "caption-keys", "tuning",
    "indexing", "publishing",
)


class BuildCancelled(KvclipError):
    """The build was asked to stop; nothing was published."""


class BuildMonitor:
    """The no-op monitor: builds without a caller watching use this."""

    def step(self, name: str, total: int) -> None:
        """A new step starts; `total` units of work (0: unknown or instant)."""

    def advance(self, n: int = 1) -> None:
        """`n` more units of the current step are done."""

    def check(self) -> None:
        """Raise BuildCancelled if the build should stop."""


class CallbackMonitor(BuildMonitor):
    """Reports (step, done, total) to `on_progress`; stops when `cancelled()` turns true."""

    def __init__(
        self,
        on_progress: Callable[[str, int, int], None] | None = None,
        cancelled: Callable[[], bool] | None = None,
    ) -> None:
        self.on_progress = on_progress
        self.cancelled = cancelled
        self.name, self.done, self.total = "", 0, 0

    def step(self, name: str, total: int) -> None:
        self.name, self.done, self.total = name, 0, max(0, int(total))
        self._report()

    def advance(self, n: int = 1) -> None:
        self.done += n
        if self.total:  # a known total is never overshot (skipped files still count as done)
            self.done = min(self.done, self.total)
        self._report()

    def check(self) -> None:
        if self.cancelled is not None and self.cancelled():
            raise BuildCancelled("build cancelled")

    def _report(self) -> None:
        if self.on_progress is not None:
            self.on_progress(self.name, self.done, self.total)
