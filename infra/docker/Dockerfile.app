# syntax=docker/dockerfile:1
# Slim image for everything but the GPU worker: gateway, producer (sqs|http), webhook deliverer, ops.
#   docker build -f infra/docker/Dockerfile.app -t birefnet-app:0.1.0 .
# The command picks the role, e.g. `python -m producer.gateway` (default), `python -m producer http`,
# `python -m deliverer`.

FROM python:3.11-slim-bookworm AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1
WORKDIR /src
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
# README.md is read by the build backend (pyproject's `readme`).
COPY pyproject.toml README.md ./
COPY common ./common
COPY producer ./producer
COPY deliverer ./deliverer
COPY worker ./worker
COPY ops ./ops
RUN pip install --no-cache-dir .

FROM python:3.11-slim-bookworm
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
# 8080: gateway; 8081: producer in http mode (MinIO webhook target).
EXPOSE 8080 8081
CMD ["python", "-m", "producer.gateway"]
