FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY backbone backbone
COPY streams streams
COPY processors processors
COPY projections projections
COPY connectors connectors
COPY configuration configuration
COPY schemas schemas
RUN pip install --no-cache-dir .
USER nobody
