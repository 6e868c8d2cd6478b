"""Plain-text tables and JSON for the CLI's output."""
from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from typing import Any

from kvclip.build_summary import report_lines
from kvclip.clients.models import CacheInfo, Classification, Job, Neighbor, SearchPath
from kvclip.clients.progress import format_seconds


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]], right: Sequence[int] = ()) -> str:
    """Columns padded to their widest cell; columns listed in `right` are right-aligned."""
    cells = [[str(c) for c in headers]] + [[("" if c is None else str(c)) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = []
    for row in cells:
        parts = [c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))]
        lines.append("  ".join(parts).rstrip())
    return "\n".join(lines)


def to_json(value: Any) -> str:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = dataclasses.asdict(value)
    elif isinstance(value, list):
        value = [dataclasses.asdict(v) if dataclasses.is_dataclass(v) and not isinstance(v, type) else v
                 for v in value]
    return json.dumps(value, indent=2)


def classification(result: Classification) -> str:
    """One row per label (its probability under "score"); with explain, one per nearest
    support item (its cosine affinity under "affinity", a different quantity)."""
    rows: list[list[Any]] = []
    for image in result.results:
        if image.error is not None:
            rows.append([image.name, "-", f"error: {image.error.code}: {image.error.message}", "", ""])
            continue
        if image.abstained:
            rows.append([image.name, "-", "none of these (top score below min_score)", "", ""])
        for rank, label in enumerate(image.labels, 1):
            rows.append([image.name if rank == 1 and not image.abstained else "", rank, label.label,
                         f"{label.score:.4f}", ""])
        for n in image.neighbors or []:
            rows.append(["", "", f"  ~ {n.label} {neighbor_text(n)}", "", f"{n.affinity:.4f}"])
    explained = any(image.neighbors for image in result.results)
    headers = ("image", "rank", "label", "score", "affinity") if explained else ("image", "rank", "label", "score")
    rows = rows if explained else [row[:4] for row in rows]
    head = f"cache {result.cache} {result.version}, method {result.method}, model {result.model}"
    return head + "\n" + table(headers, rows, right=(1, 3, 4))


def neighbor_text(n: Neighbor) -> str:
    """A support item's provenance: real with its caption, or synthetic with generator and prompt."""
    if n.origin == "synthetic":
        by = f" by {n.generator}" if n.generator else ""
        prompt = n.prompt or n.caption
        return f"(item {n.item}, synthetic{by}, {n.name or '?'})" + (f' prompt "{prompt}"' if prompt else "")
    return f"(item {n.item}, real, {n.name or '?'})" + (f' "{n.caption}"' if n.caption else "")


def caches(infos: list[CacheInfo]) -> str:
    if not infos:
        return "no caches are served"
    rows = [[c.name, c.version, c.best_method, ",".join(c.methods), c.classes, c.items, "yes" if c.captions else "no"]
            for c in infos]
    return table(("cache", "version", "best", "methods", "classes", "items", "captions"), rows, right=(4, 5))


def cache_detail(info: CacheInfo) -> str:
    versions = []
    for v in info.versions or []:
        marks = [m for m, on in (("served", v == info.version), ("CURRENT", v == info.current_version)) if on]
        versions.append(f"{v} ({', '.join(marks)})" if marks else v)
    lines = [
        f"cache        {info.name}",
        f"serving      {info.version}",
        f"versions     {', '.join(versions) or '-'}",
        f"model        {info.model}",
        f"methods      {', '.join(info.methods)} (best: {info.best_method})",
        f"classes      {info.classes}",
        f"items        {info.items}" + (" with captions" if info.captions else ""),
        f"created      {info.created or '-'}",
        f"search path  {search_text(info.search)}",
        f"keys         {info.key_precision or '-'}",
        f"labels       {', '.join(info.labels or [])}",
    ]
    return "\n".join(lines)


def search_text(search: SearchPath | None) -> str:
    if search is None:
        return "-"
    return f"{search.path} ({search.reason}: {search.detail})"


def jobs(items: list[Job]) -> str:
    if not items:
        return "no jobs"
    rows = [[j.id, j.cache, j.state, j.step or "", f"{j.done}/{j.total}", format_seconds(j.elapsed_s),
             j.version or "", j.error or ""] for j in items]
    return table(("job", "cache", "state", "step", "done", "elapsed", "version", "error"), rows)


def job(item: Job) -> str:
    lines = [f"job {item.id}: cache {item.cache}, {item.state}"
             + (f" at {item.step} {item.done}/{item.total}" if not item.finished and item.step else "")
             + f", {format_seconds(item.elapsed_s)} elapsed"]
    if item.version:
        lines.append(f"version {item.version}" + (" (activated)" if item.activated else " (not activated)"))
    if item.error:
        lines.append(f"error: {item.error}")
    if item.succeeded and item.report:
        lines += report_lines(item.report)
    return "\n".join(lines)


def cancelled_job(item: Job) -> str:
    """`kvclip jobs cancel`: say that the cancel was asked for, then where the job is."""
    if item.finished and not item.cancel_requested:
        head = f"job {item.id} had already ended ({item.state}); nothing to cancel"
    elif item.state == "cancelled":
        head = f"cancelled job {item.id}"
    else:
        head = f"cancel requested for job {item.id}; it stops at its next step (`kvclip jobs show {item.id}`)"
    return head + "\n" + job(item)
