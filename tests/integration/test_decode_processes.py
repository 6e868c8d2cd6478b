"""--decode-processes: images decoded in worker processes answer as with the decode threads
(results, per-image errors, 4xx), the workers import nothing heavy, a worker that dies is
replaced (the request it held gets a 503, later ones are served), and the workers stop
with the server.

Each worker start costs a Python + torch import (seconds on a 2-core machine): the
comparisons share one module-scoped app; the recovery test starts its own.
"""
from __future__ import annotations

import asyncio
import functools
import io
import os
import signal

import numpy as np
import pytest
import torch
from PIL import Image

from kvclip.device_decode import DeviceJpegDecoder
from kvclip.images import decode_image
from kvclip.service import api_classify
from kvclip.service.admission import BoundedDecoder, DecodeWorkerLost
from kvclip.service.batcher import Overloaded
from kvclip.service.decode_pool import from_worker
from kvclip.service.decode_worker import prepare_in_worker
from kvclip.service.pixels import RequestImage, prepare
from tests import decode_probe
from tests.bad_inputs import BOMB_PIXELS, OVERSIZED_BYTES, corpus
from tests.service_helpers import make_config, running_app
from tests.waiting import until

pytestmark = pytest.mark.anyio
CLASSIFY = "/v1/classify"
PARAMS = {"cache": "fashion", "top_k": 10, "explain": "true"}
LIMITS = dict(max_image_bytes=OVERSIZED_BYTES, max_pixels=BOMB_PIXELS)


def jpeg(width: int, height: int, seed: int = 0) -> bytes:
    """A photo-like (smooth) JPEG."""
    coarse = np.random.default_rng(seed).integers(0, 256, (height // 100, width // 100, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(coarse).resize((width, height), Image.Resampling.BILINEAR).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


@pytest.fixture(scope="module")
def photos(fashion_test) -> list[tuple[str, bytes, str]]:
    pngs = sorted(fashion_test.rglob("*.png"), key=lambda p: p.name)[:3]
    return ([(p.name, p.read_bytes(), "image/png") for p in pngs]
            + [("small.jpg", jpeg(640, 480, 1), "image/jpeg"), ("big.jpg", jpeg(2400, 1600, 2), "image/jpeg")])


def test_the_big_jpeg_decodes_at_a_reduced_scale(photos, tiny_encoder):
    big = photos[-1][1]
    assert decode_image(big, BOMB_PIXELS, min_size=tiny_encoder.image_size).width < 2400


@pytest.fixture(scope="module")
async def threads(served_caches, tiny_encoder):
    async with running_app(make_config(served_caches, **LIMITS), tiny_encoder) as (app, client):
        yield client


@pytest.fixture(scope="module")
async def processes(served_caches, tiny_encoder):
    config = make_config(served_caches, decode_processes=2, **LIMITS)
    async with running_app(config, tiny_encoder) as (app, client):
        yield app.state.kv, client


async def answer(client, files, **params) -> tuple[int, dict]:
    response = await client.post(CLASSIFY, params={**PARAMS, **params},
                                 files=[("file", f) for f in files])
    return response.status_code, response.json()


async def test_ready_means_every_worker_is_up(processes):
    state, _ = processes
    assert len(state.decode_processes.pids) == 2
    assert state.decoder.pool is state.decode_processes


async def test_the_workers_import_neither_torch_nor_the_model_nor_the_web_stack(processes):
    state, _ = processes
    assert state.decode_processes.submit(decode_probe.heavy_modules).result(timeout=120) == []


async def test_pixels_are_the_threads_to_the_byte(processes, photos, tiny_encoder):
    state, _ = processes
    for name, data, _ in photos:
        item = RequestImage(0, name, data)
        here = prepare(item, tiny_encoder.preprocess, BOMB_PIXELS, tiny_encoder.image_size)
        there = from_worker(state.decode_processes.submit(
            functools.partial(prepare_in_worker, max_pixels=BOMB_PIXELS, min_size=tiny_encoder.image_size),
            item).result(timeout=120))
        assert here.pixels is not None and there.pixels is not None
        assert there.pixels.dtype == here.pixels.dtype and there.pixels.shape == here.pixels.shape
        assert there.pixels.numpy().tobytes() == here.pixels.numpy().tobytes(), name


async def test_classify_answers_as_with_threads(processes, threads, photos):
    _, client = processes
    ours = await answer(client, photos)
    assert ours[0] == 200, ours
    assert ours == await answer(threads, photos)


@pytest.mark.parametrize("partial", ["false", "true"])
async def test_bad_images_answer_as_with_threads(processes, threads, photos, partial):
    """Every kind of hostile upload (corrupt, truncated, a pixel bomb, too many bytes, ...)
    between good images: the same status and body (400 naming it, or its per-image error)."""
    _, client = processes
    statuses = set()
    for kind, data, ctype in corpus():
        files = [photos[0], (kind, data, ctype), photos[1]]
        ours = await answer(client, files, partial=partial)
        assert ours == await answer(threads, files, partial=partial), kind
        statuses.add(ours[0])
    assert statuses == ({200, 400, 413, 415} if partial == "false" else {200}), statuses


async def test_the_backlog_bound_and_cancellation_hold_over_processes(processes, tmp_path):
    state, _ = processes
    decoder = BoundedDecoder(state.decode_processes, limit=8)
    gate = tmp_path / "gate"
    held = asyncio.ensure_future(decoder.map(decode_probe.wait_for, [str(gate)] * 6))
    await until(lambda: decoder.pending == 6, what="6 images admitted")
    # Admitted is not taken: on a busy machine no worker may have picked one up yet.
    await until(gate.with_suffix(".started").exists, what="a worker holding one of the images")
    with pytest.raises(Overloaded):  # 6 + 3 > 8: refused whole, before any is sent
        await decoder.map(len, [b"a", b"b", b"c"])
    held.cancel()  # the client left: the images no worker has taken are dropped
    await asyncio.gather(held, return_exceptions=True)
    taken = decoder.pending
    assert 0 < taken < 6
    gate.touch()
    await until(lambda: decoder.pending == 0, what="the taken images done")
    assert (tmp_path / "gate.ran").read_text().count("ran") == taken


async def test_a_dead_worker_is_replaced_and_the_workers_stop_with_the_server(served_caches, tiny_encoder, photos):
    config = make_config(served_caches, decode_processes=1)
    async with running_app(config, tiny_encoder) as (app, client):
        state = app.state.kv
        pool = state.decode_processes
        started = pool.pids
        # Killed while idle: the next request starts a new pool and is served.
        os.kill(started[0], signal.SIGKILL)
        await until(lambda: pool._pool._broken, what="the pool seeing its worker die")
        assert (await answer(client, photos[:2]))[0] == 200
        assert pool.replaced == 1
        second = pool.pids
        # Dying under a request: that request gets the 503 (DecodeWorkerLost), the next is served.
        with pytest.raises(DecodeWorkerLost):
            await state.decoder.map(decode_probe.die, [None])
        assert (await answer(client, photos[:2]))[0] == 200
        assert pool.replaced == 2
        pids = started + second + pool.pids
        assert len(set(pids)) == 3
    for pid in pids:  # joined (reaped), not orphans or zombies
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)



async def test_with_a_device_decoder_the_jpegs_stay_on_a_thread_and_the_rest_go_to_the_workers(
        processes, threads, photos, tiny_encoder, monkeypatch):
    """A CUDA encoder's path (decode_jpeg on the CPU standing in): the request's JPEGs in one
    batch on a decode thread (the device is the server process's), its PNGs in the workers."""
    state, client = processes
    batches: list[list[str]] = []

    class SpyDecoder(DeviceJpegDecoder):
        def __call__(self, datas, headers, names):
            batches.append(list(names))
            return super().__call__(datas, headers, names)

    spy = SpyDecoder(torch.device("cpu"), tiny_encoder.image_size)
    monkeypatch.setattr(api_classify.DeviceJpegDecoder, "for_encoder", classmethod(lambda cls, encoder: spy))
    sent = state.decode_processes.submit
    in_workers: list[str] = []
    monkeypatch.setattr(state.decode_processes, "submit",
                        lambda fn, *args: in_workers.extend(a.name for a in args) or sent(fn, *args))
    ours = await answer(client, photos)
    assert ours[0] == 200, ours
    assert batches == [["small.jpg", "big.jpg"]] and in_workers == [name for name, _, _ in photos[:3]]
    assert ours == await answer(threads, photos)
