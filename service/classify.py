"""The classify pipeline, written once for the plain server and the Ray Serve app:
request bytes -> image -> tensor (decode pool) -> feature -> logits -> top-k labels and
nearest support items (the injected encoding: the Batcher encodes and blends in one batch
job; on Ray, @serve.batch runs the same batch job) ->
ClassifyResponse.

Reading the body is service/parsing.py; finding the cache is the caller's (the registry, or
a Ray replica's multiplexed slot). Failures are domain errors or HttpError, answered by
service/errors.py.
"""
from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from PIL import Image

from kvclip.blend import affinities, blend, blend_candidates, candidate_affinities
from kvclip.device_decode import DeviceJpegDecoder, JpegHeader
from kvclip.errors import ImageDecodeError
from kvclip.index import search_candidates
from kvclip.manifest import GeneratorInfo
from kvclip.service.admission import BoundedDecoder
from kvclip.service.batcher import Scoring
from kvclip.service.config import ServerConfig
from kvclip.service.decode_pool import ProcessDecodePool, from_worker
from kvclip.service.decode_worker import prepare_in_worker
from kvclip.service.errors import HttpError
from kvclip.service.parsing import ClassifyRequest
from kvclip.service.pixels import Prepared, RequestImage, prepare
from kvclip.service.registry import LoadedCache
from kvclip.service.schemas import ClassifyParams, ClassifyResponse, ImageResult

log = logging.getLogger("kvclip.service")


class ImageEncoding(Protocol):
    """How pixels become scored results; kvclip.service.batcher.Batcher is one."""

    async def score_images(self, pixels: torch.Tensor, scoring: Scoring) -> list:
        """`scoring.score` of the features of one request's k preprocessed images, on the
        thread that owns the device: k results, in order."""


@dataclass(frozen=True)
class ScoreOptions:
    method: str
    top_k: int
    explain_k: int  # 0: no neighbours
    faiss_k: int
    min_score: float | None = None  # abstain when the top calibrated score is below it


@dataclass
class Scored:
    labels: list[tuple[str, float, float]]  # (label, calibrated probability, raw logit), best first
    neighbors: list[dict] | None
    abstained: bool = False


@dataclass(frozen=True)
class ClassifyPipeline:
    config: ServerConfig
    preprocess: Callable[[Image.Image], torch.Tensor]
    decoder: BoundedDecoder  # the decode pool, with its bound on images in flight
    encoding: ImageEncoding
    decode_size: int | None = None  # the model's input size: large JPEGs decode at reduced DCT scale
    # A CUDA encoder's: a request's JPEGs decode in one batch on the device (kvclip/device_decode.py).
    jpeg_decoder: DeviceJpegDecoder | None = None
    # --decode-processes: Pillow's images are prepared there (the device batch stays on a thread).
    processes: ProcessDecodePool | None = None

    async def run(self, cache: LoadedCache, request: ClassifyRequest) -> ClassifyResponse:
        """Classify the request's images against one cache snapshot."""
        params = request.params
        method = choose_method(cache, params.method)
        prepared = await self.decode_images(request.images)
        usable = usable_images(prepared, params.partial)
        options = score_options(self.config, method, params, cache.artifact.default_min_score(method))
        scored = await self.score_images(usable, cache, options)
        return ClassifyResponse(
            cache=cache.name, version=cache.version, method=method, model=cache.model_id,
            results=[to_result(p, scored.get(p.index)) for p in prepared],
        )

    async def decode_images(self, images: list[RequestImage]) -> list[Prepared]:
        """bytes -> image -> tensor, one image per decode-pool task, or one task per request
        with a device JPEG decoder (Overloaded when the decode backlog cannot take them all)."""
        prepare_one: Callable[[RequestImage], Prepared] = functools.partial(
            prepare, preprocess=self.preprocess, max_pixels=self.config.max_pixels, min_size=self.decode_size)
        if self.processes is not None:
            in_worker = functools.partial(prepare_in_worker, max_pixels=self.config.max_pixels,
                                          min_size=self.decode_size)
            if self.jpeg_decoder is None:
                return [from_worker(r) for r in await self.decoder.map(in_worker, images)]
            prepare_one = functools.partial(_in_process, self.processes, in_worker)
        elif self.jpeg_decoder is None:
            return await self.decoder.map(prepare_one, images)
        return await self.decoder.map_batch(
            functools.partial(prepare_batch, prepare_one=prepare_one, jpegs=self.jpeg_decoder,
                              max_pixels=self.config.max_pixels), images)

    async def score_images(self, usable: list[Prepared], cache: LoadedCache, options: ScoreOptions) -> dict[int, Scored]:
        """tensor -> feature -> logits, batched with other requests; by image index."""
        if not usable:
            return {}
        results = await self.encoding.score_images(torch.stack([p.pixels for p in usable]),
                                                   scoring_for(cache, options))
        return {p.index: r for p, r in zip(usable, results)}


def scoring_for(cache: LoadedCache, options: ScoreOptions) -> Scoring:
    """Requests scored together must share the snapshot object (a hot swap makes a new one, so
    versions never mix) and the options; the partial holds the snapshot, keeping its id unique
    while the job lives."""
    return Scoring(functools.partial(score, cache=cache, options=options), key=(id(cache), options))


def choose_method(cache: LoadedCache, requested: str) -> str:
    """The method to run: the cache's tuned one for 'auto'; 422 when the cache cannot serve it."""
    method = cache.artifact.best_method if requested == "auto" else requested
    if method not in cache.artifact.methods:
        raise HttpError(422, "invalid_parameters",
                        f"cache {cache.name!r} cannot serve method {method!r} "
                        f"(it serves {', '.join(cache.artifact.methods)})")
    return method


def _in_process(processes: ProcessDecodePool, in_worker: Callable, item: RequestImage) -> Prepared:
    """prepare_one on a device batch's thread: the image waits for a decode worker process."""
    return from_worker(processes.submit(in_worker, item).result())


def prepare_batch(
    items: Sequence[RequestImage],
    prepare_one: Callable[[RequestImage], Prepared],
    jpegs: DeviceJpegDecoder,
    max_pixels: int,
) -> list[Prepared]:
    """A request's images with a device decoder: the JPEGs it accepts in one batched decode on
    the device, the others through `prepare_one` (Pillow); all pixels end on that device."""
    out: list[Prepared | None] = [None] * len(items)
    on_device: list[tuple[int, RequestImage, JpegHeader]] = []
    for i, item in enumerate(items):
        try:
            header = None if item.refused else jpegs.accepts(item.data, max_pixels, item.name)
        except ImageDecodeError as exc:  # over the pixel limit
            out[i] = Prepared(item.index, item.name, None, str(exc))
            continue
        if header is None:
            out[i] = prepare_one(item)
        else:
            on_device.append((i, item, header))
    if on_device:
        decoded = jpegs([item.data for _, item, _ in on_device], [h for _, _, h in on_device],
                        [item.name for _, item, _ in on_device])
        for (i, item, _), pixels in zip(on_device, decoded):
            out[i] = (Prepared(item.index, item.name, None, str(pixels)) if isinstance(pixels, ImageDecodeError)
                      else Prepared(item.index, item.name, pixels))
    prepared = [p for p in out if p is not None]
    for p in prepared:  # one request's pixels stack on one device
        if p.pixels is not None:
            p.pixels = p.pixels.to(jpegs.device)
    return prepared


def usable_images(prepared: list[Prepared], partial: bool) -> list[Prepared]:
    """The usable images; without `partial`, any that does not decode fails the request with 400
    naming it (the parser already refused the others: service/parsing.py check_images)."""
    bad = [p for p in prepared if p.pixels is None]
    if bad and not partial:
        raise HttpError(400, "bad_image",
                        f"{len(bad)} of {len(prepared)} images could not be decoded: {bad[0].error}",
                        [{"index": p.index, "name": p.name, "message": p.error} for p in bad])
    return [p for p in prepared if p.pixels is not None]


def score_options(config: ServerConfig, method: str, params: ClassifyParams,
                  default_min_score: float | None = None) -> ScoreOptions:
    """The request's options; without a min_score the cache's default for the method (if any)."""
    min_score = default_min_score if params.min_score is None else params.min_score
    return ScoreOptions(method=method, top_k=params.top_k, explain_k=config.explain_k if params.explain else 0,
                        faiss_k=config.faiss_k, min_score=min_score)


def score(features: torch.Tensor, cache: LoadedCache, options: ScoreOptions) -> list[Scored]:
    """Blend logits for `features` (k x D) against one cache snapshot; runs on the device thread."""
    tensors = cache.tensors
    features = features.to(device=tensors.device, dtype=torch.float32)
    params = cache.params(options.method)
    ids = None
    if _use_candidates(cache, options.method):
        ids = search_candidates(features, cache.artifact.image_index, cache.artifact.caption_index,
                                options.faiss_k, params.delta)
        logits = blend_candidates(features, tensors, params, options.method, ids)
    else:
        logits = blend(features, tensors, params, options.method)
    # Calibrated (docs/methods.md, "Calibration"); the transform is increasing, so the top-k by
    # logit is the top-k by score.
    probs = cache.artifact.calibrated(logits, options.method)
    k = min(options.top_k, logits.shape[1])
    top_logits, top_i = logits.topk(k, dim=-1)
    top_p = probs.gather(1, top_i)
    neighbors = _neighbors(features, cache, params.delta, options.explain_k, ids) if options.explain_k else None
    labels = cache.labels
    # One device-to-host copy per tensor, not one per image.
    rows = zip(top_i.tolist(), top_p.tolist(), top_logits.tolist())
    floor = options.min_score
    return [
        Scored(labels=[(labels[i], p, lg) for i, p, lg in zip(ids, ps, lgs)],
               neighbors=None if neighbors is None else neighbors[row],
               abstained=floor is not None and bool(ps) and ps[0] < floor)
        for row, (ids, ps, lgs) in enumerate(rows)
    ]


def to_result(p: Prepared, scored: Scored | None) -> ImageResult:
    """One image's entry in the response: its labels, or why it could not be read."""
    if scored is None:
        return ImageResult(index=p.index, name=p.name, error={"code": p.code, "message": p.error})
    return ImageResult(
        index=p.index, name=p.name,
        labels=[{"label": lb, "score": s, "logit": lg} for lb, s, lg in scored.labels],
        neighbors=scored.neighbors, abstained=scored.abstained,
    )


def _use_candidates(cache: LoadedCache, method: str) -> bool:
    """Blend over FAISS candidates where the cache's search path, chosen at load, is FAISS for
    this method (service/search_path.py): only methods without a KL term qualify. The Tip term
    exp(−β(1 − A)) is negligible far from the query, so the nearest keys carry it; the KL term
    (γ ≠ 0, Tip-X and CapS) gives every support item a weight rescaled over the whole cache, so
    a top-k subset changes the answer (docs/methods.md)."""
    return cache.search.path == "faiss" and method in cache.search.methods


def _neighbors(
    features: torch.Tensor, cache: LoadedCache, delta: float, k: int, ids: torch.Tensor | None
) -> list[list[dict]]:
    """The k support items with the highest affinity (the method's mix of image and caption keys)."""
    if cache.num_items == 0:
        return [[] for _ in range(features.shape[0])]
    if ids is None:
        affinity = affinities(features, cache.tensors, delta)
        values, items = affinity.topk(min(k, cache.num_items), dim=-1)
    else:  # large cache: rank the FAISS candidates only
        ids = ids.clamp_min(0)
        affinity = candidate_affinities(features, cache.tensors, ids, delta)
        values, slots = affinity.topk(min(k, ids.shape[1]), dim=-1)
        items = ids.gather(1, slots)
    generator = cache.artifact.manifest.generator
    rows = []
    for row_items, row_values in zip(items.tolist(), values.tolist()):
        seen, row = set(), []
        for item, value in zip(row_items, row_values):
            if item in seen:
                continue
            seen.add(item)
            meta = cache.artifact.items[item] if item < len(cache.artifact.items) else {}
            row.append({
                "item": item,
                "label": cache.labels[int(cache.artifact.label_ids[item])],
                "caption": meta.get("caption"),
                "name": str(meta.get("path", "")).rsplit("/", 1)[-1] or None,
                "affinity": value,
                **provenance(meta, generator),
            })
        rows.append(row)
    return rows


def provenance(meta: dict, generator: GeneratorInfo | None) -> dict:
    """Where a support item came from: a real image, or one the build rendered (its prompt and
    the generator's model; a model folder on the server by its name only)."""
    if meta.get("origin") != "synthetic":
        return {"origin": "real", "prompt": None, "generator": None}
    return {"origin": "synthetic", "prompt": meta.get("prompt"),
            "generator": None if generator is None else _model_label(generator.model)}


def _model_label(model: str) -> str:
    """A hub id as it is; a model folder on the server by its name only (like `name` for files)."""
    return model.rstrip("/").rsplit("/", 1)[-1] if model.startswith("/") else model
