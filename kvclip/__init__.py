"""kvclip: training-free zero-shot image classification with CLIP key-value caches."""

__version__ = "0.1.0"
