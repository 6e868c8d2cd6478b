"""Errors that carry a message meant for the user: what went wrong and what to do.

`exit_status` is what the `kvclip` command exits with (README "Exit status"): 2 when what
the user gave is wrong (arguments, the files and folders they name, data that cannot make
a cache), 1 when something fails while running (weights that cannot be had, a corrupt cache).
"""


class KvclipError(Exception):
    """Base of kvclip's user-facing errors."""

    exit_status = 2


class UsageError(KvclipError):
    """An argument, or a file or folder an argument names, that cannot work (checked before
    any heavy import)."""


class ModelLoadError(KvclipError):
    """A model or its weights could not be loaded."""

    exit_status = 1


class InvalidModelName(UsageError, ModelLoadError):
    """A model name that cannot name a model (syntax, unknown architecture, missing file)."""

    exit_status = 2


class ImageDecodeError(KvclipError):
    """Bytes or a file that are not a usable image."""


class DataError(KvclipError):
    """A data folder, manifest, labels or captions that cannot make a cache."""


class ArtifactError(KvclipError):
    """A cache artifact that is missing, incomplete or corrupt."""

    exit_status = 1
