"""kvclip on Ray Serve: `serve run kvclip.deploy.ray.app:build_app caches=DIR model=NAME` (docs/deploy-ray.md)."""
