"""The LitServe side of scripts/bench_server.py: the same model, decode and preprocessing as
kvclip, served by LitServe's batching (a benchmark helper, not part of kvclip).

    .venv-litserve/bin/python scripts/litserve_app.py --model ARCH:/path.pt --cache CACHE --port 8001

bench_server.py makes the venv (LitServe from PyPI; torch, open_clip and kvclip from the project
venv) and starts this file with it. POST /predict takes one multipart image file, like kvclip's
/v1/classify, and answers its top-k zero-shot labels against the cache's text classifier.
"""
from __future__ import annotations

import argparse

import litserve as ls
import torch

from kvclip.artifact import load_cache
from kvclip.images import decode_image
from kvclip.models import load_encoder


class ClipAPI(ls.LitAPI):
    def __init__(self, model: str, cache: str, top_k: int, **batching) -> None:
        super().__init__(**batching)
        self.model_name, self.cache_dir, self.top_k = model, cache, top_k

    def setup(self, device: str) -> None:
        self.encoder = load_encoder(self.model_name, device)
        artifact = load_cache(self.cache_dir, indexes=False)
        self.labels = artifact.labels
        self.text_weights = torch.from_numpy(artifact.text_weights).to(self.encoder.device)

    def decode_request(self, request) -> torch.Tensor:
        # kvclip's decode (reduced DCT scale for large JPEGs) and its bounded preprocessing.
        data = request["file"].file.read()
        return self.encoder.preprocess(decode_image(data, min_size=self.encoder.image_size))

    def batch(self, inputs: list[torch.Tensor]) -> torch.Tensor:
        return torch.stack(inputs)

    def predict(self, pixels: torch.Tensor) -> list[list[tuple[str, float]]]:
        logits = 100.0 * self.encoder.encode_images(pixels) @ self.text_weights
        scores, ids = logits.softmax(dim=-1).topk(min(self.top_k, logits.shape[1]), dim=-1)
        return [[(self.labels[i], s) for i, s in zip(row_ids, row_scores)]
                for row_ids, row_scores in zip(ids.tolist(), scores.tolist())]

    def unbatch(self, output: list) -> list:
        return output

    def encode_response(self, output: list[tuple[str, float]]) -> dict:
        return {"labels": [{"label": label, "score": score} for label, score in output]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--cache", required=True, help="a kvclip cache folder (its labels and text weights)")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--max-batch", type=int, default=32)
    parser.add_argument("--batch-timeout-ms", type=float, default=10.0)
    parser.add_argument("--top-k", type=int, default=5)
    parser.add_argument("--device", default="auto", help="LitServe accelerator: auto, cpu or cuda")
    args = parser.parse_args()
    api = ClipAPI(args.model, args.cache, args.top_k, max_batch_size=args.max_batch,
                  batch_timeout=args.batch_timeout_ms / 1000, api_path="/predict")
    server = ls.LitServer(api, accelerator=args.device, devices=1, workers_per_device=1)
    server.run(host="127.0.0.1", port=args.port, num_api_servers=1, log_level="warning",
               generate_client_file=False)


if __name__ == "__main__":
    main()
