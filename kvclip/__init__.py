"""kvclip: training-free zero-shot image classification with CLIP key-value caches."""

from kvclip.vocabulary import VERSION as __version__

__all__ = ["__version__"]
