"""The lines a finished build prints: what it read, what it skipped, its captions, its pool and
its rendered images.

One renderer for `kvclip build` (from the manifest's build report) and `kvclip caches build`
(from the job's report, which carries the same fields plus "captioner"). Plain dicts and the
standard library only: the client install renders it without pydantic or torch.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

CACHE_ONLY_METHODS = "tip, tipx"


def report_lines(report: Mapping[str, Any], captioner: Mapping[str, Any] | None = None) -> list[str]:
    """Indented lines describing a build report (BuildReport as JSON); `captioner` defaults
    to the report's own "captioner" entry (a job's report has one)."""
    lines = [f"  source {report.get('source', '?')}: used {report.get('used', 0)} of "
             f"{report.get('candidates', 0)} images, skipped {report.get('skipped_count', 0)}"]
    lines += [f"  skipped {s['path']}: {s['reason']}" for s in report.get("skipped") or []]
    short = report.get("short_classes") or {}
    if short:
        lines.append("  warning: fewer support images than asked for in "
                     + ", ".join(f"{label} ({count})" for label, count in short.items())
                     + "; those classes use all they have")
    pool = report.get("pool")
    if pool:
        per_class = ", ".join(f"{label} {c['count']}" for label, c in pool["per_class"].items())
        lines.append(f"  pool: {pool['usable']} usable of {pool['images']} images; per class: {per_class}")
        if pool.get("empty_classes"):
            lines.append(f"  no pool image for: {', '.join(pool['empty_classes'])} (zero-shot text weights only)")
    captioner = captioner if captioner is not None else report.get("captioner")
    if captioner and report.get("used"):
        lines.append("  " + captioner_line(captioner))
    synth = report.get("synthesis")
    if synth:
        per_class = ", ".join(f"{label} {c['real']}/{c['synthetic']}"
                              for label, c in (report.get("origin_per_class") or {}).items())
        lines.append(f"  synthetic: {synth['rendered']} rendered, {synth['reused']} reused, {synth['retried']} "
                     f"retried, {len(synth['failed'])} failed; per class (real/synthetic): {per_class}")
        lines += [f"  no image for {f['label']!r} ({f['prompt']}): {f['reason']}" for f in synth["failed"]]
    return lines


def captioner_line(info: Mapping[str, Any]) -> str:
    """What the captioner did and what it means for the methods served."""
    name = info.get("name", "?")
    # Generated captions a rebuild found in the caption cache are still generated ones.
    cached = f" ({info['cached']} from the caption cache)" if info.get("cached") else ""
    if name == "none":
        return f"captions: none; image keys only (serves zeroshot, {CACHE_ONLY_METHODS}; no caps)"
    if name != "auto":
        return f"captions: {name}{cached}; every image captioned (serves caps too)"
    counts = f"{info.get('sidecar', 0)} from caption files, {info.get('generated', 0)} generated{cached}"
    missing = info.get("uncaptioned", 0)
    if not missing:
        return f"captions: auto, {counts}; every image captioned (serves caps too)"
    return (f"captions: auto, {counts}, {missing} without; image keys only (serves zeroshot, "
            f"{CACHE_ONLY_METHODS}; caps needs a caption for every image)")


def tuning_lines(loo_top1: Mapping[str, float], best_method: str, best_params: Mapping[str, Any],
                 pool_build: bool) -> list[str]:
    """The leave-one-out accuracies and the method auto serves, with what the numbers mean."""
    lines = []
    if loo_top1:
        scores = ", ".join(f"{k} {v:.3f}" for k, v in loo_top1.items())
        if pool_build:
            lines.append(f"  agreement with the zero-shot pseudo-labels (leave-one-out): {scores}")
            lines.append("  (zero-shot agrees with its own pseudo-labels by construction, so these are not "
                         "accuracies; a pool build serves tip with fixed training-free parameters)")
        else:
            lines.append(f"  leave-one-out top-1 on the support set (each image classified without itself): {scores}")
    params = ", ".join(f"{k} {v:g}" for k, v in best_params.items()) if best_params else "no parameters"
    lines.append(f"  method auto serves {best_method} ({params})")
    return lines
