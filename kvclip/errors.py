"""Errors that carry a message meant for the user: what went wrong and what to do."""


class KvclipError(Exception):
    """Base of kvclip's user-facing errors."""


class ModelLoadError(KvclipError):
    """A model or its weights could not be loaded."""


class ImageDecodeError(KvclipError):
    """Bytes or a file that are not a usable image."""


class DataError(KvclipError):
    """A data folder, manifest, labels or captions that cannot make a cache."""


class ArtifactError(KvclipError):
    """A cache artifact that is missing, incomplete or corrupt."""
