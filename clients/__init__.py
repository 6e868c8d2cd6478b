"""kvclip's Python client: classify images and manage caches and builds on a kvclip server.

    from kvclip.clients import KvclipClient
    with KvclipClient("http://127.0.0.1:8000") as client:
        result = client.classify(["cat.jpg", "dog.png"], cache="pets", top_k=3)
        print(result.results[0].top.label)
"""
from kvclip.clients.client import AsyncKvclipClient, KvclipClient
from kvclip.clients.errors import ApiError, InputError, JobFailed, KvclipClientError, ServerUnreachable
from kvclip.clients.models import (
                            CacheInfo,
                            Classification,
                            ImageError,
                            ImageResult,
                            Job,
                            LabelScore,
                            Neighbor,
                            Readiness,
                            ReloadResult,
)

__all__ = [
    "KvclipClient", "AsyncKvclipClient",
    "KvclipClientError", "ApiError", "ServerUnreachable", "InputError", "JobFailed",
    "Classification", "ImageResult", "LabelScore", "Neighbor", "ImageError", "CacheInfo", "ReloadResult",
    "Readiness", "Job",
]
