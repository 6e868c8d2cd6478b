# kvclip: the classification server (`kvclip serve`, the default command) and the offline
# cache builder (`docker run IMAGE build DATA --out /caches/NAME ...`) in one image.
#
#   CPU (default):  docker build -t kvclip:cpu .
#   GPU:            docker build -t kvclip:gpu --build-arg FLAVOR=gpu \
#                     --build-arg BASE=nvidia/cuda:12.4.1-cudnn-runtime-ubuntu22.04 .
#   Weights baked in for air-gapped hosts:   --build-arg MODEL_WEIGHTS=ViT-B-32:openai
#   Local wheels instead of a torch index:   put wheels in ./.wheels, --build-arg WHEELHOUSE=.wheels
#
# Build args
#   BASE             base image of both stages (needs python3 >= 3.10 with venv, or apt-get)
#   FLAVOR           cpu | gpu: faiss-cpu or faiss-gpu, and where torch comes from
#   TORCH_INDEX_URL  index for torch/torchvision; default: https://download.pytorch.org/whl/cpu
#                    for cpu (CPU-only wheels, ~10x smaller), PyPI for gpu (CUDA wheels);
#                    "pypi" forces PyPI
#   TORCH_SPEC       requirement(s) for torch and torchvision (default "torch torchvision")
#   FAISS_SPEC       override the faiss requirement (default by FLAVOR)
#   WHEELHOUSE       a folder of the build context holding wheels: torch/torchvision (and their
#                    dependencies) are installed from it alone (--no-index), everything else
#                    may also come from it (--find-links). Empty (default): not used.
#   PIP_EXTRA        extra pip options for every install (e.g. "--index-url https://mirror/simple")
#   MODEL_WEIGHTS    model to download at build time into /models (e.g. ViT-B-32:openai); the
#                    build fails, saying so, when the hub cannot be reached
#
# Configuration is by environment (every `kvclip serve --foo-bar` flag is KVCLIP_FOO_BAR;
# docs/server.md); KVCLIP_MODEL is required at run time.

ARG BASE=python:3.11-slim

# ---------------------------------------------------------------------------- base
FROM ${BASE} AS base
# python:3.11-slim has python3 + venv already; CUDA (Ubuntu) bases get Debian/Ubuntu's python3.
RUN if ! python3 -c 'import venv, ensurepip' 2>/dev/null; then \
        apt-get update \
        && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
             python3 python3-venv ca-certificates \
        && rm -rf /var/lib/apt/lists/*; \
    fi \
    && python3 -c 'import sys; assert sys.version_info >= (3, 10), "kvclip needs Python >= 3.10, the base has " + sys.version'
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1

# ---------------------------------------------------------------------------- builder
FROM base AS builder
ARG FLAVOR=cpu
ARG TORCH_INDEX_URL=
ARG TORCH_SPEC="torch torchvision"
ARG FAISS_SPEC=
ARG WHEELHOUSE=
ARG PIP_EXTRA=
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
# 1. torch + torchvision. The build context is bind-mounted (not copied into a layer), so a
#    multi-GB wheelhouse costs no image space.
RUN --mount=type=bind,target=/ctx \
    set -eu; \
    case "$FLAVOR" in cpu|gpu) ;; *) echo "FLAVOR must be cpu or gpu, not '$FLAVOR'" >&2; exit 2;; esac; \
    if [ -n "$WHEELHOUSE" ]; then \
        [ -d "/ctx/$WHEELHOUSE" ] || { echo "WHEELHOUSE=$WHEELHOUSE: no such folder in the build context" >&2; exit 2; }; \
        src="--no-index --find-links /ctx/$WHEELHOUSE"; \
    else \
        url="$TORCH_INDEX_URL"; \
        if [ -z "$url" ] && [ "$FLAVOR" = cpu ]; then url=https://download.pytorch.org/whl/cpu; fi; \
        if [ -z "$url" ] || [ "$url" = pypi ]; then src=""; else src="--index-url $url"; fi; \
    fi; \
    echo "torch: pip install $src $TORCH_SPEC"; \
    pip install $src $PIP_EXTRA $TORCH_SPEC
# 2. kvclip itself without dependencies, then its base and `server` extra dependencies
#    (faiss by flavour): the image builds and serves, so it needs kvclip[server].
COPY pyproject.toml README.md /src/
COPY kvclip /src/kvclip
COPY cache_builder /src/cache_builder
COPY service /src/service
COPY clients /src/clients
COPY deploy /src/deploy
RUN --mount=type=bind,target=/ctx \
    set -eu; \
    find=""; [ -z "$WHEELHOUSE" ] || find="--find-links /ctx/$WHEELHOUSE"; \
    faiss="$FAISS_SPEC"; \
    if [ -z "$faiss" ]; then if [ "$FLAVOR" = gpu ]; then faiss=faiss-gpu-cu12; else faiss=faiss-cpu; fi; fi; \
    pip install $find $PIP_EXTRA --no-deps /src; \
    python -c "from importlib.metadata import requires; \
reqs = [r.partition(';') for r in requires('kvclip')]; \
print('\n'.join(name.strip() for name, _, marker in reqs \
                if ('extra' not in marker or 'server' in marker) and not name.startswith('faiss')))" \
        > /tmp/requirements.txt; \
    pip install $find $PIP_EXTRA -r /tmp/requirements.txt "$faiss"; \
    python -c "import torch, torchvision, open_clip, faiss, kvclip, kvclip.service.app; \
print('kvclip deps OK: torch', torch.__version__, 'faiss', faiss.__version__)"
# 3. Optional: model weights baked in for hosts without hub access.
ARG MODEL_WEIGHTS=
ENV HF_HUB_CACHE=/models KVCLIP_MODEL_CACHE_DIR=/models
RUN mkdir -p /models && if [ -n "$MODEL_WEIGHTS" ]; then \
      python -c "import sys; from kvclip.models import load_encoder; \
load_encoder(sys.argv[1], device='cpu', cache_dir='/models'); print('baked', sys.argv[1], 'into /models')" \
        "$MODEL_WEIGHTS" \
      || { echo "ERROR: MODEL_WEIGHTS=$MODEL_WEIGHTS: the weights could not be downloaded at build time" \
                "(is the model hub, huggingface.co, reachable from this build?). Build on a machine that" \
                "reaches it, or leave MODEL_WEIGHTS empty and mount a checkpoint at run time" \
                "(KVCLIP_MODEL=ARCH:/path/to/checkpoint)." >&2; exit 1; }; \
    fi; \
    find /opt/venv -name '__pycache__' -prune -exec rm -rf {} +

# ---------------------------------------------------------------------------- final
FROM base AS final
ARG FLAVOR=cpu
ARG MODEL_WEIGHTS=
LABEL org.opencontainers.image.title="kvclip" \
      org.opencontainers.image.description="Training-free zero-shot image classification server (CLIP + key-value caches)" \
      io.kvclip.flavor="${FLAVOR}" io.kvclip.model-weights="${MODEL_WEIGHTS}"
RUN groupadd --system --gid 10001 kvclip \
    && useradd --system --uid 10001 --gid kvclip --home-dir /home/kvclip --create-home \
         --shell /usr/sbin/nologin kvclip \
    && mkdir -p /caches /models \
    && chown kvclip:kvclip /caches
COPY --from=builder /opt/venv /opt/venv
COPY --from=builder --chown=10001:10001 /models /models
ENV PATH=/opt/venv/bin:$PATH \
    HOME=/home/kvclip \
    HF_HUB_CACHE=/models \
    KVCLIP_MODEL_CACHE_DIR=/models \
    KVCLIP_CACHES=/caches \
    KVCLIP_HOST=0.0.0.0 \
    KVCLIP_PORT=8000 \
    KVCLIP_LOG_FORMAT=json \
    OMP_WAIT_POLICY=PASSIVE
# Compute threads follow the container's CPU limit: `kvclip serve` sets OMP_NUM_THREADS from
# the cgroup quota at start unless it is set here or at run time (kvclip/threads.py).
USER 10001:10001
WORKDIR /home/kvclip
VOLUME /caches
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python3", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('KVCLIP_PORT', '8000'), timeout=4)"]
ENTRYPOINT ["kvclip"]
CMD ["serve"]
