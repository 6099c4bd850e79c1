# syntax=docker/dockerfile:1
# skqk-serve image, one for every role: `skqk serve` (default), `skqk worker`, `skqk init`, …
#   CPU (default):  docker build -t skqk-serve .
#   CUDA:           docker build --build-arg TORCH_VARIANT=cu128 -t skqk-serve:cuda .
#   run:            docker run -p 127.0.0.1:8000:8000 -v skqk-data:/data skqk-serve
#                   (the named volume keeps the SQLite store and the generated key across runs)
# Needs BuildKit (cache mounts): Docker >= 23 uses it by default; else DOCKER_BUILDKIT=1.
#
# Every version comes from constraints.txt, torch's included (no second pin here). The CUDA
# wheels of torch bring their own CUDA runtime, so one slim base serves both variants; the host
# needs only the NVIDIA driver and container toolkit.
#
# Layers, slowest-changing first: torch (keyed on constraints.txt and the variant), the other
# dependencies (keyed on constraints.txt and the dependency list of pyproject.toml, not on the
# source), then the source itself (`pip install --no-deps .`: seconds). pip's cache lives in a
# cache mount, never in a layer.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# ---- the runtime requirements (dependencies + extras) of pyproject.toml, as a file ------------
# A stage of its own so that only the requirement list, not the rest of pyproject.toml
# (version, tool settings), keys the dependency layer below.
FROM ${PYTHON_IMAGE} AS requirements
# extras: "files" adds pyarrow for CSV/Parquet (`skqk init --data`, `skqk ingest`,
# SKQK_BOOTSTRAP_DATA), "import" onnx + onnxruntime (`skqk import/export`); serving replicas need
# neither: --build-arg SKQK_EXTRAS= . ("experiments", matplotlib + mlxtend, stays out.)
ARG SKQK_EXTRAS=files,import
WORKDIR /src
COPY pyproject.toml ./
COPY deploy/deps.py ./deploy/
RUN python deploy/deps.py requirements --extras "${SKQK_EXTRAS}" > requirements.txt

# ---- the image -----------------------------------------------------------------------------
FROM ${PYTHON_IMAGE}
ARG TORCH_VARIANT=cpu
ARG TORCH_INDEX=https://download.pytorch.org/whl
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore \
    SKQK_DATA_DIR=/data

# torch alone first: constraints.txt's release with the variant's local label (2.x.y+cpu,
# +cu128), which only the variant's index has, so the CPU image can never fall back to PyPI's
# CUDA build; torch's own dependencies come from PyPI at their pinned versions.
RUN --mount=type=cache,target=/root/.cache/pip \
    --mount=type=bind,source=constraints.txt,target=/tmp/constraints.txt \
    torch="$(grep -i '^torch==' /tmp/constraints.txt)" && test -n "${torch}" \
 && pip install -c /tmp/constraints.txt --extra-index-url "${TORCH_INDEX}/${TORCH_VARIANT}" \
        "${torch}+${TORCH_VARIANT}"

# Everything else, before any source is copied: a code edit never reinstalls these.
RUN --mount=type=cache,target=/root/.cache/pip \
    --mount=type=bind,source=constraints.txt,target=/tmp/constraints.txt \
    --mount=type=bind,from=requirements,source=/src/requirements.txt,target=/tmp/requirements.txt \
    pip install -c /tmp/constraints.txt -r /tmp/requirements.txt
RUN useradd --create-home --uid 10001 skqk && mkdir -p /data && chown skqk /data

WORKDIR /srv/skqk
COPY --chmod=755 deploy/healthcheck.py /usr/local/bin/skqk-healthcheck
COPY pyproject.toml README.md ./
COPY workers ./workers
COPY app ./app
RUN --mount=type=cache,target=/root/.cache/pip \
    pip install --no-deps . && rm -rf build ./*.egg-info

USER skqk
# No VOLUME: an anonymous volume per `docker run` would lose the SQLite store between runs;
# mount a named one (`-v skqk-data:/data`). With Postgres (docker-compose.yml) /data holds nothing
# that must survive.
EXPOSE 8000
# Per role: serve → /v2/health/ready, worker → Celery ping of this node, one-shot commands → healthy.
HEALTHCHECK --interval=15s --timeout=10s --start-period=120s --retries=3 CMD ["skqk-healthcheck"]
CMD ["skqk", "serve", "--host", "0.0.0.0", "--port", "8000"]
