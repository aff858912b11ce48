# syntax=docker/dockerfile:1.7
# The inference image: a CUDA runtime base, CPython 3.11 (uv's standalone build), torch's CUDA wheels
# and Ray from deploy/requirements-inference.lock (the same pins as the backbone image's lock, plus the
# `inference` extra). It runs the Ray head (`ray start --head`), a GPU Ray worker
# (`ray start --address=ray-head:6379 --block`) and `backbone inference run` (the embedding actor pool).
#
# Build from the repository root: docker build -f deploy/docker/inference.Dockerfile -t sophia/backbone-inference .
# tests/unit/test_deploy_images.py imports every module of every package from the file list below.
FROM ghcr.io/astral-sh/uv:0.9.7 AS uv
FROM nvidia/cuda:13.0.0-runtime-ubuntu24.04

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    UV_PYTHON_INSTALL_DIR=/opt/python \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    BACKBONE_STATE_DIR=/var/lib/backbone \
    BACKBONE_LOG_FORMAT=json \
    HF_HOME=/var/lib/backbone/hf

COPY --from=uv /uv /usr/local/bin/uv
RUN uv venv --python 3.11 /opt/venv

WORKDIR /app
COPY deploy/requirements-inference.lock /tmp/requirements.lock
RUN uv pip install --no-deps -r /tmp/requirements.lock

COPY pyproject.toml README.md ./
COPY core core
COPY backbone backbone
COPY streams streams
COPY processors processors
COPY projections projections
COPY connectors connectors
COPY configuration configuration
COPY inference inference
COPY schemas schemas
RUN uv pip install --no-deps . \
 && mkdir -p /var/lib/backbone/hf && chown -R 65532:65532 /var/lib/backbone

USER 65532:65532
# Ray: GCS 6379, dashboard 8265, client 10001; the actor pool's /metrics on 9100.
EXPOSE 6379 8265 10001 9100
CMD ["backbone", "inference", "run"]
