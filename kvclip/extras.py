"""pyproject.toml's extras as modules, and the check a command makes before it needs one.

The base install is the HTTP client (`kvclip classify`, `kvclip caches ...`, `kvclip jobs ...`);
building and serving need `kvclip[server]`. Standard library only: this runs in the light install.
"""
from __future__ import annotations

import importlib.util
import sys

from kvclip.errors import KvclipError

SERVER = "server"
CAPS = "caps"  # hf:/openai: captioners, Stable Diffusion support images, kvclip describe
# The top-level modules each extra's distributions install (tests/unit/test_extras.py holds
# this to pyproject.toml's list).
EXTRA_MODULES: dict[str, tuple[str, ...]] = {
    SERVER: ("torch", "torchvision", "open_clip", "faiss", "numpy", "PIL", "fastapi", "uvicorn", "httptools",
             *(() if sys.platform == "win32" else ("uvloop",)),  # pyproject's marker: no uvloop on Windows
             "multipart", "pydantic", "prometheus_client", "swagger_ui_bundle"),
    CAPS: ("transformers", "openai", "diffusers"),
}


class MissingExtra(KvclipError):
    """A command needs packages of an extra that is not installed."""


def missing_modules(extra: str) -> list[str]:
    """The extra's modules that this environment cannot import."""
    return [name for name in EXTRA_MODULES[extra] if importlib.util.find_spec(name) is None]


def require_extra(extra: str, command: str) -> None:
    """Raise MissingExtra, naming what to install, when `extra`'s packages are missing."""
    missing = missing_modules(extra)
    if missing:
        raise MissingExtra(f"`kvclip {command}` needs the {extra} extra (missing: {', '.join(missing)}); "
                           f"install it with: pip install 'kvclip[{extra}]'")
