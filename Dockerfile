# syntax=docker/dockerfile:1.7
# The backbone image: every long-running process except inference (processors, projections, config
# relay, CDC normaliser, HTTP API, topic/connector jobs). Dependencies come from deploy/requirements.lock
# (deploy/lock.sh: `uv pip compile`, the same pins as deploy/requirements-inference.lock).
#
# tests/unit/test_deploy_images.py builds this file list the way Docker does (it parses the COPY lines
# below) and imports every CLI command module from it: a package the CLI imports and no COPY names
# fails that test. Keep the package COPY lines one per package.
FROM python:3.11.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    BACKBONE_STATE_DIR=/var/lib/backbone \
    BACKBONE_LOG_FORMAT=json

WORKDIR /app
COPY deploy/requirements.lock /tmp/requirements.lock
RUN pip install --no-deps -r /tmp/requirements.lock

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
RUN pip install --no-deps . \
 && mkdir -p /var/lib/backbone && chown 65532:65532 /var/lib/backbone

USER 65532:65532
EXPOSE 9100 8000
ENTRYPOINT ["backbone"]
CMD ["--help"]
