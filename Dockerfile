# One image for the whole service: `flow-compress serve --no-worker` (API) and
# `flow-compress worker` (a GPU worker). torch's PyPI wheels bundle the CUDA runtime, so the
# same image runs on CPU and, with a GPU reserved for the container, on CUDA.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    MPLBACKEND=Agg \
    FLOW_COMPRESS_STORAGE_DIR=/data

RUN useradd --create-home --uid 1000 app \
    && mkdir -p /data \
    && chown app:app /data

WORKDIR /app

# Dependencies first (a layer that survives source edits): install the project once with
# empty packages, then again with the sources and --no-deps.
COPY pyproject.toml README.md ./
RUN mkdir -p flow_compress api worker \
    && touch flow_compress/__init__.py api/__init__.py worker/__init__.py \
    && pip install . \
    && pip uninstall -y flow-compress \
    && rm -rf flow_compress api worker build

COPY flow_compress ./flow_compress
COPY api ./api
COPY worker ./worker
RUN pip install --no-deps . && rm -rf build

USER app
VOLUME ["/data"]
EXPOSE 8000

# The API by default; docker-compose.yml runs the worker from the same image.
CMD ["flow-compress", "serve", "--no-worker", "--host", "0.0.0.0", "--port", "8000"]
