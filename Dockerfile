# skqk-serve image: API replicas (`skqk serve`) and retrain workers (`skqk worker`).
#   CPU (default, slim):  docker build -t skqk-serve .
#   CUDA:                 docker build --build-arg TORCH_VARIANT=cu128 -t skqk-serve:cuda .
# The CUDA wheels of torch carry their own CUDA runtime, so one slim base serves both; the
# host only needs the NVIDIA driver and container toolkit.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm
FROM ${PYTHON_IMAGE}

ARG TORCH_VERSION=2.13.0
ARG TORCH_VARIANT=cpu
# extras: "files" adds pyarrow for CSV/Parquet (`skqk init --data`, `skqk ingest`,
# SKQK_BOOTSTRAP_DATA), "import" onnx + onnxruntime (`skqk import/export`); serving replicas
# need neither: --build-arg SKQK_EXTRAS=
ARG SKQK_EXTRAS=files,import
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    SKQK_DATA_DIR=/data

# torch first, from the variant's index, so the project's `torch==` pin is already met.
RUN pip install "torch==${TORCH_VERSION}" --index-url "https://download.pytorch.org/whl/${TORCH_VARIANT}"

WORKDIR /srv/skqk
COPY pyproject.toml README.md ./
COPY app ./app
COPY workers ./workers
RUN pip install ".${SKQK_EXTRAS:+[${SKQK_EXTRAS}]}" && useradd --create-home --uid 10001 skqk && mkdir -p /data && chown skqk /data

USER skqk
VOLUME ["/data"]
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s --start-period=120s --retries=3 \
  CMD python -c "import urllib.request,sys; urllib.request.urlopen('http://127.0.0.1:8000/v2/health/ready', timeout=2)" || exit 1
CMD ["skqk", "serve", "--host", "0.0.0.0", "--port", "8000"]
