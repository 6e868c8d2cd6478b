"""Resident memory per loaded cache: everything the artifact holds vs only what serving reads (a benchmark).

    python scripts/bench_cache_memory.py --caches 10 --keys 16000 --classes 100

Publishes K synthetic caches (N unit keys with caption keys, C classes, D=512, flat FAISS
indexes, seeded) into a temporary folder, then loads all of them in a fresh Python process per
way of loading, the two ways interleaved over rounds:
  everything  load_cache() as before: every array (the tuner's query features too) and both
              FAISS indexes, read into anonymous memory;
  serving     what kvclip serve loads now: SERVING_ARRAYS memory-mapped, FAISS indexes only
              that --search-path auto may search (above --probe-min-keys).
Each then builds the blend's CPU tensors, and the process reports its RSS growth per cache,
split into anonymous memory (private to the process) and file-backed pages (shared by every
process that serves the same version, and reclaimable).
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.manifests: a complete sample manifest

CHILD = r"""
import json, sys
from pathlib import Path
from kvclip import artifact as store
from kvclip.service.search_path import SearchPolicy

def status():
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
    kib = lambda key: int(fields[key].split()[0])
    return kib("RssAnon") / 1024, kib("RssFile") / 1024

root, mode = Path(sys.argv[1]), sys.argv[2]
import torch, faiss, numpy  # imported before the baseline: only the caches are measured
before = status()
held = []
for folder in sorted(root.iterdir()):
    if mode == "everything":
        artifact = store.load_cache(folder)
    else:
        artifact = store.load_cache(folder, arrays=store.SERVING_ARRAYS, mmap=True, index_min_items=SearchPolicy().index_min_items)
    held.append((artifact, artifact.tensors("cpu")))
after = status()
print(json.dumps({"anon": after[0] - before[0], "file": after[1] - before[1], "caches": len(held)}))
"""


def publish_caches(root: Path, count: int, keys: int, classes: int, dim: int) -> None:
    import numpy as np

    from kvclip import artifact as store
    from kvclip.index import build_index
    from tests.manifests import sample_manifest

    rng = np.random.default_rng(0)

    def unit(a: np.ndarray, axis: int) -> np.ndarray:
        return (a / np.linalg.norm(a, axis=axis, keepdims=True)).astype(np.float32)

    labels = [f"class {c}" for c in range(classes)]
    for i in range(count):
        image_keys, caption_keys = unit(rng.normal(size=(keys, dim)), 1), unit(rng.normal(size=(keys, dim)), 1)
        label_ids = np.arange(keys) % classes
        manifest = sample_manifest(name=f"c{i}", labels=labels, counts={
            "classes": classes, "items": keys, "dim": dim, "skipped": 0,
            "per_class": {lb: int((label_ids == c).sum()) for c, lb in enumerate(labels)}})
        store.publish(root / f"c{i:03d}", store.CacheArtifact(
            labels=labels, text_weights=unit(rng.normal(size=(dim, classes)), 0), image_keys=image_keys,
            label_ids=label_ids, query_features=image_keys.copy(), caption_keys=caption_keys,
            items=[{"path": f"/data/{j}.jpg", "label": labels[j % classes], "caption": f"photo {j}"}
                   for j in range(keys)],
            manifest=manifest, image_index=build_index(image_keys), caption_index=build_index(caption_keys)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--caches", type=int, default=10)
    ap.add_argument("--keys", type=int, default=16_000)
    ap.add_argument("--classes", type=int, default=100)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        publish_caches(root, args.caches, args.keys, args.classes, args.dim)
        results: dict[str, list[dict]] = {"everything": [], "serving": []}
        for r in range(args.rounds):
            for mode in (("everything", "serving") if r % 2 == 0 else ("serving", "everything")):
                out = subprocess.run([sys.executable, "-c", CHILD, str(root), mode], check=True,
                                     capture_output=True, text=True).stdout
                results[mode].append(json.loads(out.strip().splitlines()[-1]))
    print(f"{args.caches} caches of {args.keys} keys x {args.classes} classes, D={args.dim}, "
          f"{args.rounds} rounds (median MiB per cache)")
    print("| loading | anonymous | file-backed (shared) | total RSS |")
    print("|---|---:|---:|---:|")
    for mode, rows in results.items():
        anon = statistics.median(r["anon"] / r["caches"] for r in rows)
        file = statistics.median(r["file"] / r["caches"] for r in rows)
        print(f"| {mode} | {anon:.1f} | {file:.1f} | {anon + file:.1f} |")


if __name__ == "__main__":
    main()
