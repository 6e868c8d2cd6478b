"""Server paths out of answers for callers without the admin scope.

Build reports and job records name files and folders on the server (where a build read its
data, the job's work folder, a file it skipped). An admin key sees them as they are; a read
key sees only the last part of each, so a skipped file is still recognisable but the server's
layout is not disclosed (service/deps.py sees_server_paths decides).
"""
from __future__ import annotations

import re

# An absolute path inside free text (an error message): from a "/" that starts a word to the
# next space, quote, bracket or separator.
_ABSOLUTE_PATH = re.compile(r"(?<![\w.~-])/[^\s'\"(),;]+")
MARK = "<server path>"


def file_name(path: str) -> str:
    """The last part of a path, marked as redacted; text without a "/" as it is (a bare file
    name, or a source such as "3 labels given in memory")."""
    if "/" not in path:
        return path
    name = path.rstrip("/").rsplit("/", 1)[-1]
    return f"{MARK}/{name}" if name else MARK


def redact_text(text: str | None) -> str | None:
    """`text` with every absolute path cut down to its last part."""
    if text is None:
        return None
    return _ABSOLUTE_PATH.sub(lambda m: file_name(m.group(0)), text)


def redact_report(report: dict | None) -> dict | None:
    """A build report (the manifest's build_report, as JSON) without server paths."""
    if report is None:
        return None
    out = {**report, "source": file_name(str(report.get("source", ""))), "skipped": _skipped(report)}
    if out.get("pool"):
        out["pool"] = {**out["pool"], "skipped": _skipped(out["pool"])}
    captioner = out.get("captioner")
    if isinstance(captioner, dict) and isinstance(captioner.get("model"), str):  # hf: a folder under --models-dir
        out["captioner"] = {**captioner, "model": model_name(captioner["model"])}
    return out


def model_name(model: str) -> str:
    """A model as recorded: a hub id or open_clip name as it is, a server folder cut to its name."""
    return file_name(model) if model.startswith("/") else model


def _skipped(part: dict) -> list[dict]:
    return [{**s, "path": file_name(str(s.get("path", ""))), "reason": redact_text(s.get("reason"))}
            for s in part.get("skipped", [])]


def redact_job(job: dict) -> dict:
    """A job record (BuildJob.as_dict) without server paths."""
    options = {k: file_name(v) if k in ("data_dir", "pool_dir") and isinstance(v, str) else v
               for k, v in job.get("options", {}).items()}
    return {**job, "error": redact_text(job.get("error")), "report": redact_report(job.get("report")),
            "options": options}
