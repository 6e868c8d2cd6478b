"""A live view of a build job for the terminal: a tqdm bar per step, with the server's ETA.

The server knows the step, done/total and an ETA; the bar shows those rather than tqdm's
own rate estimate, which would be wrong across polls and steps. Without a terminal (logs,
CI) it prints one line per step instead of redrawing a bar.
"""
from __future__ import annotations

import sys
from typing import TextIO

from tqdm import tqdm

from kvclip.clients.models import Job

_BAR = "{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt}{postfix}"
_COUNT = "{desc}: {n_fmt}{postfix}"


def format_seconds(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    seconds = round(seconds)
    minutes, secs = divmod(seconds, 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}" if minutes else f"{secs}s"


class JobProgress:
    """Pass as build_cache(progress=...); call close() when the build ends."""

    def __init__(self, stream: TextIO | None = None, live: bool | None = None) -> None:
        self._stream = stream or sys.stderr
        self._live = self._stream.isatty() if live is None else live
        self._bar: tqdm | None = None
        self._shown: tuple[str, str | None] | None = None  # (state, step) last shown

    def __call__(self, job: Job) -> None:
        step = job.step or job.state
        key = (job.state, job.step)
        if not self._live:
            if key != self._shown:
                total = f" {job.done}/{job.total}" if job.total else ""
                print(f"job {job.id} {job.state}: {step}{total}", file=self._stream, flush=True)
            self._shown = key
            return
        if key != self._shown:
            self._close_bar()
            bar_total = job.total or None
            self._bar = tqdm(total=bar_total, desc=step, bar_format=_BAR if bar_total else _COUNT,
                             file=self._stream, dynamic_ncols=True, leave=False)
            self._shown = key
        bar = self._bar
        assert bar is not None  # made above when the step began
        if job.total and bar.total != job.total:
            bar.total = job.total
        bar.n = job.done
        bar.set_postfix_str(f"elapsed {format_seconds(job.elapsed_s)}, ETA {format_seconds(job.eta_s)}",
                            refresh=True)

    def close(self) -> None:
        self._close_bar()

    def _close_bar(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
