"""Build job records on disk: one small JSON file per job, written atomically, so a restarted
server still reports the builds it ran (GET /v1/jobs/{id}).

They live in the job area's records/ folder (CACHES/.jobs/records by default), next to the
jobs' work folders. A record is rewritten whenever its job changes state, not on every
progress step.
"""
from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path

log = logging.getLogger("kvclip.jobs")
RECORDS_DIR = "records"


class JobRecords:
    def __init__(self, jobs_root: Path) -> None:
        self.root = Path(jobs_root) / RECORDS_DIR

    def save(self, record: dict) -> None:
        """Replace the job's record in one rename: a crash leaves the old record or the new one."""
        self.root.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=self.root)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                json.dump(record, fh, ensure_ascii=False)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self.root / f"{record['id']}.json")
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def remove(self, job_id: str) -> None:
        (self.root / f"{job_id}.json").unlink(missing_ok=True)

    def load(self) -> list[dict]:
        """Every readable record; unreadable ones (and write leftovers) are logged and removed."""
        if not self.root.is_dir():
            return []
        records = []
        for path in sorted(self.root.iterdir()):
            try:
                record = json.loads(path.read_text(encoding="utf-8")) if path.suffix == ".json" else None
                if not isinstance(record, dict) or record.get("id") != path.stem:
                    raise ValueError("not a job record")
                records.append(record)
            except (OSError, ValueError) as exc:
                log.warning("removing unreadable job record %s: %s", path.name, exc)
                path.unlink(missing_ok=True)
        return records
