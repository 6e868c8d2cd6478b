"""Decode worker processes' pieces without a server: the portable preprocess, errors that
cross the process boundary, and the --decode-processes setting."""
from __future__ import annotations

import inspect
import io
import pickle

import numpy as np
import pytest
from PIL import Image

from kvclip import errors
from kvclip.preprocess import BoundedPreprocess
from kvclip.service.admission import BoundedDecoder
from kvclip.service.batcher import Stopped
from kvclip.service.config import ServerConfig, add_arguments, from_namespace
from kvclip.service.decode_pool import ProcessDecodePool, from_worker
from kvclip.service.pixels import Prepared, RequestImage, prepare


def picture(width: int, height: int, fmt: str) -> bytes:
    rng = np.random.default_rng(width)
    coarse = rng.integers(0, 256, (height // 16, width // 16, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(coarse).resize((width, height), Image.Resampling.BILINEAR).save(buf, format=fmt)
    return buf.getvalue()


def test_the_portable_preprocess_pickles_without_torch_or_open_clip_and_gives_the_same_pixels(tiny_encoder):
    portable = tiny_encoder.preprocess.portable()
    data = pickle.dumps(portable)
    assert b"open_clip" not in data and b"torch" not in data  # torchvision too
    assert b"open_clip" in pickle.dumps(tiny_encoder.preprocess)  # why portable() exists
    again = pickle.loads(data)
    for width, height, fmt in ((640, 480, "JPEG"), (300, 500, "PNG"), (32, 32, "PNG")):
        item = RequestImage(0, "x", picture(width, height, fmt))
        ours = prepare(item, again, 10**8, tiny_encoder.image_size).pixels
        theirs = prepare(item, tiny_encoder.preprocess, 10**8, tiny_encoder.image_size).pixels
        assert ours is not None and theirs is not None
        assert isinstance(ours, np.ndarray) and ours.flags.c_contiguous
        assert ours.dtype == np.uint8 and ours.shape == tuple(theirs.shape) and ours.tobytes() == theirs.numpy().tobytes()


@pytest.mark.parametrize("mode, resize, kept", [
    ("shortest", 32, ["ConvertMode"]),  # open_clip's default: Resize(S), CenterCrop(S) leave S x S as it is
    ("shortest", (32, 32), ["ConvertMode"]),
    ("squash", (32, 32), ["Resize", "CenterCrop", "ConvertMode"]),  # the whole image reaches the steps
])
def test_the_portable_preprocess_drops_only_steps_that_change_nothing(mode, resize, kept):
    from torchvision import transforms as T

    from kvclip.portable_preprocess import ConvertMode

    transform = T.Compose([T.Resize(resize, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(32),
                           ConvertMode("RGB"), T.ToTensor(), T.Normalize((0.5,) * 3, (0.25,) * 3)])
    preprocess = BoundedPreprocess(transform, 32, resize_mode=mode)
    portable = preprocess.portable()
    assert [type(step).__name__ for step in portable.steps] == kept
    for width, height, fmt in ((640, 480, "JPEG"), (300, 500, "PNG"), (32, 32, "PNG")):
        image = Image.open(io.BytesIO(picture(width, height, fmt)))
        assert portable(image).tobytes() == preprocess(image).numpy().tobytes()


def test_pixels_cross_as_numpy_and_come_back_as_the_same_tensor(tiny_encoder):
    prepared = prepare(RequestImage(3, "a.png", picture(64, 48, "PNG")), tiny_encoder.preprocess, 10**8, 32)
    pixels = prepared.pixels
    back = from_worker(pickle.loads(pickle.dumps((Prepared(3, "a.png", None), pixels.numpy()))))
    assert back.pixels.dtype == pixels.dtype and back.pixels.numpy().tobytes() == pixels.numpy().tobytes()


@pytest.mark.parametrize("cls", [c for _, c in inspect.getmembers(errors, inspect.isclass)
                                 if issubclass(c, errors.KvclipError)])
def test_kvclip_errors_survive_pickling(cls):
    error = cls("x.png: 5000x5000 pixels exceeds the limit of 4000000")
    back = pickle.loads(pickle.dumps(error))
    assert type(back) is cls and str(back) == str(error) and back.exit_status == error.exit_status


def test_decode_processes_is_a_flag_and_an_environment_variable(monkeypatch):
    import argparse

    monkeypatch.setenv("KVCLIP_DECODE_PROCESSES", "3")
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert from_namespace(parser.parse_args(["--caches", "c", "--model", "m"])).decode_processes == 3
    assert from_namespace(parser.parse_args(["--caches", "c", "--model", "m", "--decode-processes", "2"])).decode_processes == 2
    assert ServerConfig(caches="c", model="m").decode_processes == 0
    with pytest.raises(ValueError, match="decode_processes"):
        ServerConfig(caches="c", model="m", decode_processes=-1)


@pytest.mark.anyio
async def test_a_shut_pool_refuses_as_the_threads_do(tiny_encoder):
    pool = ProcessDecodePool(2, tiny_encoder.preprocess)  # its processes start on the first task
    decoder = BoundedDecoder(pool, limit=8)
    pool.shutdown()
    with pytest.raises(Stopped, match="shutting down"):
        await decoder.map(len, [b"x", b"y"])
    assert decoder.pending == 0 and pool.pids == []
