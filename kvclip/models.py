"""The encoder: an open_clip model created by name, behind a small interface.

Model names:
  ARCH:TAG          open_clip pretrained tag, e.g. ViT-B-32:openai, ViT-B-32:laion2b_s34b_b79k
  ARCH:/path/file   a local open_clip checkpoint (.pt, .bin, .safetensors)
  hf-hub:ORG/REPO   an open_clip model on the Hugging Face hub (or its local cache)
  local-dir:/path   a folder with open_clip_config.json and weights
  tiny-random       a tiny, seeded, randomly initialised CLIP for tests and plumbing only:
                    its zero-shot accuracy is chance; never use it to classify anything.

Weights are never replaced by random ones silently: when they cannot be had, loading fails
with ModelLoadError saying which model, where it looked and how to provide a local file.
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import socket
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import open_clip
import torch
import torch.nn.functional as F
from open_clip import pretrained as oc_pretrained

from kvclip.digests import DigestRecord
from kvclip.errors import ModelLoadError
from kvclip.hashing import sha256_file

# Names and their syntax live in the torch-free kvclip/model_names.py; re-exported here.
from kvclip.model_names import (  # noqa: F401
    CHECKPOINT_SUFFIXES,
    CONFIG_DIR,
    TINY_COCA_RANDOM,
    TINY_RANDOM,
    ModelSpec,
    parse_model_spec,
)
from kvclip.preprocess import BoundedPreprocess, channel_tensor, normalize

log = logging.getLogger("kvclip.models")
TINY_SEED = 0


class Encoder:
    """Preprocess, encode images, encode texts: all the builder and the server need of CLIP."""

    def __init__(
        self,
        spec: ModelSpec,
        model: torch.nn.Module,
        preprocess,
        tokenizer,
        device: torch.device,
        weights_sha256: str | None,
    ) -> None:
        self.spec = spec
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.device = device
        self.dtype = next(model.parameters()).dtype
        self.weights_sha256 = weights_sha256
        cfg = getattr(model.visual, "preprocess_cfg", {}) or {}
        size = cfg.get("size", getattr(model.visual, "image_size", 224))
        self.image_size: int = size if isinstance(size, int) else int(size[0])
        self.interpolation: str = cfg.get("interpolation", "bicubic")
        # PIL image -> 3 x S x S uint8 tensor (deterministic), its cost bounded by S (kvclip/preprocess.py).
        self.preprocess = BoundedPreprocess(preprocess, self.image_size, cfg.get("resize_mode", "shortest"),
                                            self.interpolation)
        # The model's own Normalize (open_clip builds it from the model's config), run on the device.
        self.mean: tuple[float, ...] = self.preprocess.mean
        self.std: tuple[float, ...] = self.preprocess.std
        self._mean = channel_tensor(self.mean, device)
        self._std = channel_tensor(self.std, device)

    @property
    def _clip(self) -> Any:
        # open_clip's CLIP/CustomTextCLIP/CoCa all have encode_image/encode_text; nn.Module's
        # __getattr__ types them as Tensor.
        return self.model

    @property
    def model_id(self) -> str:
        return self.spec.name

    def pixel_batch(self, parts: Sequence[torch.Tensor]) -> torch.Tensor:
        """One uint8 batch of preprocessed pixels: 3 x S x S images stacked, k x 3 x S x S parts
        concatenated. In page-locked memory when the encoder runs on CUDA, so that the copy in
        encode_images is asynchronous (from pageable memory CUDA stages it through a
        pinned buffer, synchronously)."""
        parts = [part.unsqueeze(0) if part.dim() == 3 else part for part in parts]
        if not parts:
            raise ValueError("pixel_batch needs at least one image")
        if any(part.device.type != "cpu" for part in parts):  # decoded on the device (kvclip/device_decode.py)
            return torch.cat([part.to(self.device) for part in parts])
        if len(parts) == 1 and not pins_host_memory(self.device):
            return parts[0]
        shape = (sum(part.shape[0] for part in parts), *parts[0].shape[1:])
        out = torch.empty(shape, dtype=torch.uint8, pin_memory=pins_host_memory(self.device))
        return torch.cat(parts, out=out)

    @torch.inference_mode()
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """B x 3 x S x S uint8 pixels (preprocess, pixel_batch) -> B x D L2-normalised float32
        features. The pixels go to the device as 8 bits and are normalised there, in float32 as
        on the host before, then cast to the model's dtype (fp16 on CUDA)."""
        size = self.image_size
        if pixels.dtype != torch.uint8 or pixels.dim() != 4 or tuple(pixels.shape[1:]) != (3, size, size):
            raise ValueError(f"encode_images takes B x 3 x {size} x {size} uint8 pixels (Encoder.preprocess), "
                             f"got {tuple(pixels.shape)} {pixels.dtype}")
        pixels = pixels.to(self.device, non_blocking=True)
        inputs = normalize(pixels, self._mean, self._std).to(self.dtype)
        return F.normalize(self._clip.encode_image(inputs).float(), dim=-1)

    @torch.inference_mode()
    def encode_texts(self, texts: Sequence[str], batch_size: int = 256) -> torch.Tensor:
        """Strings -> len(texts) x D L2-normalised float32 features (on self.device)."""
        out = []
        for start in range(0, len(texts), batch_size):
            tokens = self.tokenizer(list(texts[start : start + batch_size])).to(self.device)
            out.append(F.normalize(self._clip.encode_text(tokens).float(), dim=-1))
        return torch.cat(out)

    def info(self) -> dict:
        """What a cache manifest records of the model that built it."""
        return {
            "id": self.model_id,
            "kind": self.spec.kind,
            "arch": self.spec.arch,
            "weights_sha256": self.weights_sha256,
            "precision": str(self.dtype).replace("torch.", ""),
            "image_size": self.image_size,
            "mean": list(self.mean),
            "std": list(self.std),
        }


def pins_host_memory(device: torch.device) -> bool:
    """Whether batches for `device` are built in page-locked host memory: only a CUDA device
    copies from it asynchronously (and pinning needs a CUDA runtime)."""
    return device.type == "cuda"


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_encoder(
    name: str, device: str | torch.device | None = None, cache_dir: str | None = None,
    digests: DigestRecord | None = None,
) -> Encoder:
    """Create the encoder for a model name; fp16 on CUDA, fp32 on CPU.

    The checkpoint's sha256 (which caches record and a server compares) is hashed from the
    file, or taken from `digests` when that record knows the file unchanged (kvclip/digests.py).
    """
    spec = parse_model_spec(name)
    device = torch.device(device) if device is not None else default_device()
    model, preprocess, checkpoint = _create_model(spec, device, cache_dir)
    tokenizer = open_clip.get_tokenizer(spec.arch, cache_dir=cache_dir)
    sha256 = sha256_file if digests is None else digests.sha256
    digest = sha256(checkpoint) if checkpoint else None
    if spec.kind == "tiny-random":
        digest = state_dict_sha256(model)
    return Encoder(spec, model, preprocess, tokenizer, device, digest)


def _fill_uninitialised(model: torch.nn.Module) -> None:
    """open_clip leaves CoCa's text_decoder.text_projection as torch.empty (checkpoints fill
    it); a random model must not compute with whatever memory held, so seed it like the
    text tower's projection."""
    decoder = getattr(model, "text_decoder", None)
    projection = getattr(decoder, "text_projection", None)
    if isinstance(projection, torch.nn.Parameter):
        with torch.no_grad():
            torch.nn.init.normal_(projection, std=projection.shape[0] ** -0.5)


def create_open_clip_model(name: str, device: torch.device, cache_dir: str | None = None):
    """(model, deterministic preprocess, checkpoint path or None) for any model name."""
    return _create_model(parse_model_spec(name), device, cache_dir)


def _create_model(spec: ModelSpec, device: torch.device, cache_dir: str | None):
    precision = "fp16" if device.type == "cuda" else "fp32"
    if spec.kind == "tiny-random":
        _register_tiny_configs()
        log.warning("model %s: random weights, for tests and plumbing only (zero-shot is chance)", spec.name)
        with _quiet_open_clip(), torch.random.fork_rng(devices=[]):
            torch.manual_seed(TINY_SEED)
            model, _, preprocess = open_clip.create_model_and_transforms(
                spec.arch, pretrained=None, precision=precision, device=device
            )
            _fill_uninitialised(model)
        return model, preprocess, None

    checkpoint = _resolve_checkpoint(spec, cache_dir)
    kwargs = dict(precision=precision, device=device, cache_dir=cache_dir)
    try:
        if spec.kind in ("hf-hub", "local-dir"):
            model, _, preprocess = open_clip.create_model_and_transforms(spec.arch, **kwargs)
        else:
            model, _, preprocess = open_clip.create_model_and_transforms(
                spec.arch, pretrained=spec.source, require_pretrained=True, **kwargs
            )
    except ModelLoadError:
        raise
    except Exception as exc:  # open_clip raises RuntimeError/ValueError/OSError variously
        raise ModelLoadError(_load_failure(spec, cache_dir, exc)) from exc
    return model, preprocess, checkpoint


def _resolve_checkpoint(spec: ModelSpec, cache_dir: str | None) -> str | None:
    """The local path of the weights, fetching them if a hub is reachable."""
    assert spec.source is not None  # only tiny-random names no source, and it has no checkpoint
    if spec.kind == "file":
        _check_arch(spec)
        if not Path(spec.source).is_file():
            raise ModelLoadError(
                f"model {spec.name!r}: checkpoint file {spec.source} does not exist. "
                f"Give the path of an open_clip checkpoint for architecture {spec.arch}."
            )
        return spec.source
    if spec.kind == "local-dir":
        folder = Path(spec.source)
        found = [p for p in sorted(folder.glob("*")) if p.suffix in CHECKPOINT_SUFFIXES] if folder.is_dir() else []
        if not found:
            raise ModelLoadError(
                f"model {spec.name!r}: no open_clip_config.json with weights in {folder}."
            )
        return str(found[0])
    try:
        if spec.kind == "hf-hub":
            with _offline_unless_hub_reachable():
                return oc_pretrained.download_pretrained_from_hf(spec.source, cache_dir=cache_dir)
        _check_arch(spec)
        cfg = oc_pretrained.get_pretrained_cfg(spec.arch, spec.source)
        if not cfg:
            tags = ", ".join(open_clip.list_pretrained_tags_by_model(spec.arch)) or "none"
            raise ModelLoadError(
                f"model {spec.name!r}: {spec.source!r} is neither a pretrained tag of {spec.arch} "
                f"(known tags: {tags}) nor an existing checkpoint file."
            )
        with _offline_unless_hub_reachable():
            return oc_pretrained.download_pretrained(cfg, cache_dir=cache_dir)
    except ModelLoadError:
        raise
    except Exception as exc:
        raise ModelLoadError(_load_failure(spec, cache_dir, exc)) from exc


@contextlib.contextmanager
def _offline_unless_hub_reachable(timeout_s: float = 3.0):
    """Look in the local caches only when the hub does not answer a TCP connect.

    Without this, an offline machine spends about a minute in huggingface_hub's retries (and
    prints a warning per retry) before the same "not found" error. huggingface_hub checks its
    offline flag at request time, so setting it for the download answers from the cache at
    once; it is set back afterwards. Loading happens once, at start, before any serving thread.
    """
    from huggingface_hub import constants as hub

    if hub.HF_HUB_OFFLINE or _reachable(hub.ENDPOINT, timeout_s):
        yield
        return
    log.info("%s is unreachable: looking for the weights in the local caches only", hub.ENDPOINT)
    hub.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        hub.HF_HUB_OFFLINE = False


def _reachable(url: str, timeout_s: float) -> bool:
    parts = urlparse(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        socket.create_connection((parts.hostname or "", port), timeout=timeout_s).close()
    except OSError:  # no route, no DNS, refused, timed out
        return False
    return True


def _check_arch(spec: ModelSpec) -> None:
    _register_tiny_configs()  # so a saved tiny model loads as kvclip-tiny:/path too
    if spec.arch not in open_clip.list_models():
        raise ModelLoadError(
            f"model {spec.name!r}: unknown open_clip architecture {spec.arch!r} "
            "(see open_clip.list_models())."
        )


def _load_failure(spec: ModelSpec, cache_dir: str | None, exc: Exception) -> str:
    hf_cache = os.environ.get("HF_HUB_CACHE") or os.path.join(
        os.environ.get("HF_HOME", os.path.expanduser("~/.cache/huggingface")), "hub"
    )
    places = f"the Hugging Face cache ({hf_cache})"
    places += f" and {cache_dir}" if cache_dir else " and ~/.cache/clip"
    offline = " (HF_HUB_OFFLINE=1 is set)" if os.environ.get("HF_HUB_OFFLINE") == "1" else ""
    from huggingface_hub import constants as hub
    arch = spec.arch if spec.kind in ("tag", "file") else "ARCH"
    return (
        f"could not load the weights of model {spec.name!r}: not found in {places}, and the "
        f"hub ({hub.ENDPOINT}) could not be reached{offline}. Download the checkpoint on a machine "
        f"with access, then pass it as --model {arch}:/path/to/open_clip_model.safetensors "
        f"(or set HF_HOME / --model-cache-dir to a folder holding it), or use --model tiny-random "
        f"to try the plumbing with random weights. "
        f"Underlying error: {type(exc).__name__}: {str(exc)[:300]}"
    )


@contextlib.contextmanager
def _quiet_open_clip():
    """open_clip logs 'initialized randomly' on the root logger; we say it once, ourselves."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


def _register_tiny_configs() -> None:
    if "kvclip-tiny" not in open_clip.list_models():
        open_clip.add_model_config(CONFIG_DIR)


def state_dict_sha256(model: torch.nn.Module) -> str:
    """A fingerprint of a model's weights (for models that have no checkpoint file)."""
    digest = hashlib.sha256()
    for key, tensor in sorted(model.state_dict().items()):
        digest.update(key.encode())
        digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()
