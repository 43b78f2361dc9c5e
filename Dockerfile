# syntax=docker/dockerfile:1.7
# One image for the whole suite: `fairlane serve auth|queue|worker`, `fairlane migrate`.
#   docker build -t fairlane:0.1.0 .
#   docker run --rm fairlane:0.1.0 serve queue
# The build stage resolves and installs every dependency into a virtualenv; the runtime
# stage copies only that virtualenv onto a clean slim base: no compiler, no pip cache.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS builder
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/fairlane
ENV PATH=/opt/fairlane/bin:$PATH
WORKDIR /src
# .dockerignore is an allow-list: only pyproject.toml, README, clients/ and services/ (with
# fairlane_server, the link that gives the server package its import name) arrive.
COPY . .
# The client distribution first: the server requires it, and it is not taken from an index.
RUN pip install './clients[cli]' . \
    && fairlane --help > /dev/null

FROM ${PYTHON_IMAGE} AS runtime
LABEL org.opencontainers.image.title="fairlane" \
      org.opencontainers.image.description="Per-client FIFO request lanes over gRPC, RabbitMQ and PostgreSQL" \
      org.opencontainers.image.licenses="Apache-2.0"
ENV PATH=/opt/fairlane/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    FAIRLANE_AUTH_LISTEN=0.0.0.0:50051 \
    FAIRLANE_QUEUE_LISTEN=0.0.0.0:50052 \
    FAIRLANE_WORKER_LISTEN=0.0.0.0:50053 \
    FAIRLANE_METRICS_HOST=0.0.0.0
RUN groupadd --system --gid 10001 fairlane \
    && useradd --system --uid 10001 --gid fairlane --no-create-home \
       --home-dir /nonexistent --shell /usr/sbin/nologin fairlane
COPY --from=builder /opt/fairlane /opt/fairlane
COPY --chmod=0755 deploy/docker/healthcheck.py /usr/local/bin/fairlane-healthcheck
USER 10001:10001
WORKDIR /tmp
# gRPC: auth 50051, queue 50052, worker 50053; Prometheus /metrics: 9101, 9102, 9103.
EXPOSE 50051 50052 50053 9101 9102 9103
# SIGTERM is the graceful stop: health goes NOT_SERVING, in-flight work finishes
# within FAIRLANE_GRACE_SECONDS (20 s); give the runtime a longer stop timeout than that.
STOPSIGNAL SIGTERM
# No HEALTHCHECK here: which port to probe depends on the service the container runs.
# Compose and Kubernetes probe grpc.health.v1 themselves (see deploy/).
ENTRYPOINT ["fairlane"]
CMD ["--help"]
