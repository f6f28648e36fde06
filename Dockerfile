# ponder: one image for `ponder worker`, `ponder publish`, `ponder subscribe` and friends.
#   docker build -t ponder .
#   docker run --rm ponder worker ponder.pipelines.iot_monitor:pipeline --brokers kafka:9092
# docker-compose.yml builds it as the `worker`, `simulator` and `publisher` services.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# A fixed, non-root uid/gid so files in the state volume keep one owner across rebuilds.
RUN groupadd --system --gid 10001 ponder \
 && useradd --system --uid 10001 --gid ponder --home-dir /app --no-create-home \
            --shell /usr/sbin/nologin ponder

# Only what the package build needs (pyproject names README.md as the readme); the jax extra
# (the tiered pipeline's edge model runs in the worker), no dev/test extras. The source tree
# is removed after the install: the image runs the installed package.
COPY pyproject.toml README.md /tmp/ponder-src/
COPY ponder /tmp/ponder-src/ponder
RUN pip install "/tmp/ponder-src[jax]" \
 && rm -rf /tmp/ponder-src \
 && ponder --help > /dev/null

# The edge tier's checkpoint (docker-compose.yml: PONDER_EDGE_ENGINE=jax:/opt/ponder/models/edge):
# a `tiny` one with RANDOM weights (seed 0). Mount a trained
# checkpoint over this directory to make its answers mean something.
RUN ponder init-model /opt/ponder/models/edge --preset tiny --seed 0

# State (RocksDB, one database per group/topic-partition) lives in a volume. The directory is
# created and chowned here so that a fresh named volume mounted on it inherits the ownership.
# /app/sim is where the compose `simulator` writes its fleet for the `publisher`.
RUN mkdir -p /app/sim /var/lib/ponder \
 && chown ponder:ponder /app /app/sim /var/lib/ponder
VOLUME ["/var/lib/ponder"]

WORKDIR /app
USER ponder:ponder

# `ponder worker --metrics-port 9100` serves Prometheus /metrics here (deploy/prometheus.yml).
EXPOSE 9100

# `ponder worker` drains, checkpoints and commits on SIGTERM (the default stop signal).
ENTRYPOINT ["ponder"]
CMD ["--help"]
