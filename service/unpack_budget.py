"""How much uploaded build data may sit unpacked on the server at once, across every queued and
running job, and how much free disk space must stay: one request's limit alone lets concurrent
uploads multiply it."""
from __future__ import annotations

import shutil
import threading
from pathlib import Path

from kvclip.service.archives import ArchiveTooLarge

_DISK_CHECK_BYTES = 32 * 2**20  # free space is looked at again after this much unpacking


class UnpackBudget:
    def __init__(self, max_total_bytes: int, min_free_bytes: int) -> None:
        self.max_total_bytes, self.min_free_bytes = max_total_bytes, min_free_bytes
        self._held: dict[str, int] = {}
        self._since_check: dict[str, int] = {}
        self._lock = threading.Lock()

    @property
    def total(self) -> int:
        return sum(self._held.values())

    def check_disk(self, folder: Path, need: int = 0) -> None:
        """Refuse (413) when writing `need` more bytes under `folder` would leave too little free."""
        folder = Path(folder)
        while not folder.exists():
            folder = folder.parent
        free = shutil.disk_usage(folder).free
        if free - need < self.min_free_bytes:
            raise ArchiveTooLarge(f"the server's disk has {free} bytes free and keeps {self.min_free_bytes} "
                                  "free; try again later or upload less")

    def charge(self, job_id: str, n: int, folder: Path) -> None:
        """Count `n` more unpacked bytes for the job (413 past the total or the free-space floor)."""
        with self._lock:
            if self.total + n > self.max_total_bytes:
                raise ArchiveTooLarge(f"the uploads of queued and running builds already take "
                                      f"{self.total} of {self.max_total_bytes} bytes; try again later")
            self._held[job_id] = self._held.get(job_id, 0) + n
            since = self._since_check.get(job_id, _DISK_CHECK_BYTES) + n
            self._since_check[job_id] = 0 if since >= _DISK_CHECK_BYTES else since
        if since >= _DISK_CHECK_BYTES:
            self.check_disk(folder, _DISK_CHECK_BYTES)

    def release(self, job_id: str) -> None:
        with self._lock:
            self._held.pop(job_id, None)
            self._since_check.pop(job_id, None)
