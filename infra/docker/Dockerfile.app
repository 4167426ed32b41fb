# syntax=docker/dockerfile:1
# Slim image for everything but the GPU worker: gateway, producer (sqs|http), webhook deliverer, ops.
# The locked dependencies (requirements/app.txt, with hashes), no torch.
#   docker build -f infra/docker/Dockerfile.app -t birefnet-app:0.1.0 .
# The command picks the role, e.g. `python -m gateway` (default), `python -m producer http`,
# `python -m deliverer`.

# Only the base is meant to change (e.g. a locally bootstrapped Debian bookworm with python3).
ARG BASE_IMAGE=python:3.11-slim-bookworm

FROM ${BASE_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1
WORKDIR /src
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
COPY requirements/build.txt requirements/app.txt requirements/
# pip and setuptools from the lock first: the project is then built without an unpinned build environment.
RUN pip install --require-hashes --no-deps -r requirements/build.txt \
    && pip install --require-hashes --no-deps -r requirements/app.txt
# README.md is read by the build backend (pyproject's `readme`).
COPY pyproject.toml README.md ./
COPY common ./common
COPY gateway ./gateway
COPY producer ./producer
COPY deliverer ./deliverer
COPY worker ./worker
COPY ops ./ops
# The slim set must not pull torch in: the build fails if anything installed it.
RUN pip install --no-deps --no-build-isolation . \
    && pip check \
    && if python -c "import torch" 2>/dev/null; then echo "torch in the app image" >&2; exit 1; fi

FROM ${BASE_IMAGE}
LABEL org.opencontainers.image.title="birefnet-app" \
      org.opencontainers.image.description="fal-compatible BiRefNet service: gateway, producer, webhook deliverer, ops"
RUN groupadd --system --gid 10001 birefnet \
    && useradd --system --uid 10001 --gid birefnet --home-dir /home/birefnet --create-home \
       --shell /usr/sbin/nologin birefnet
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /home/birefnet
USER 10001:10001
# 8080: gateway; 8081: producer in http mode (the S3 store's webhook target).
EXPOSE 8080 8081
CMD ["python", "-m", "gateway"]
