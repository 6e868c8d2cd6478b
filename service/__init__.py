"""kvclip's HTTP service: FastAPI app, cross-request batcher, cache registry."""
