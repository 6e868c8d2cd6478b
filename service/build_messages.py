"""A builder's error, worded for the HTTP client that asked for the build.

The builder words its errors for the command line (paths as read, `--flag value` advice).
A client of `POST /v1/caches/{name}/builds` sent an archive and JSON options: it never saw
the server's work folder and has no flags, so paths become archive-relative and flags become
the build option that does the same.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

# The builder's flags that have a build option of the same meaning (service/schemas.py BuildOptions).
_OPTION_FLAGS = ("captioner", "captioner-model", "caption-prompt", "caption-concurrency", "shots", "views", "seed",
                 "pool-per-class", "templates", "descriptions", "labels", "synthesize", "sd-model", "guidance",
                 "steps", "support")
# Longest first: --captioner must not match the start of --captioner-model.
_FLAG = re.compile(r"--(" + "|".join(map(re.escape, sorted(_OPTION_FLAGS, key=len, reverse=True)))
                   + r")\b(?: ([A-Za-z0-9_.:-]+))?")


def for_http(message: str, uploads: dict[Path, str]) -> str:
    """`message` with each uploaded folder's path replaced by archive-relative paths, and
    command-line flags by the build options (`--captioner none` -> `"captioner": "none"`).

    `uploads`: the work folder each upload was unpacked into -> the upload's name.
    """
    for folder, name in uploads.items():
        message = message.replace(f"{folder}{os.sep}", "").replace(str(folder), name)
    return _FLAG.sub(_option, message)


def _option(match: re.Match) -> str:
    option = match.group(1).replace("-", "_")
    return f'the option "{option}": "{match.group(2)}"' if match.group(2) else f'the option "{option}"'
