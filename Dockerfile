# syntax=docker/dockerfile:1
# TokenGuard Stream: the aggregator image (default target) and the demo fleet (target "demo").
#   docker build -t tokenguard .                      # the aggregator: `tokenguard aggregator`
#   docker build --target demo -t tokenguard-demo .   # the demo fleet against an external aggregator
# Stage "wheels" builds the project's wheel and collects every dependency as a wheel, pinned by
# constraints.txt, once; the runtime stages install only from those wheels (--no-index) into a
# virtual environment, run as a non-root user, and keep no compiler, pip cache or source tree.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS wheels
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1
WORKDIR /build
# Metadata first, so the dependency layer is rebuilt only when pyproject.toml or the pins change.
COPY pyproject.toml constraints.txt README.md ./
COPY producer/ producer/
COPY aggregator/ aggregator/
COPY schemas/ schemas/
COPY transport/ transport/
RUN pip wheel --wheel-dir /wheels --constraint constraints.txt ".[demo]"

FROM ${PYTHON_IMAGE} AS base
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    VIRTUAL_ENV=/opt/tokenguard \
    PATH=/opt/tokenguard/bin:$PATH
RUN groupadd --system --gid 10001 tokenguard \
    && useradd --system --uid 10001 --gid tokenguard --no-create-home --home-dir /nonexistent \
       --shell /usr/sbin/nologin tokenguard
# The wheels stage's output is mounted, not copied: no wheel stays in a layer of this image.
RUN --mount=type=bind,from=wheels,source=/wheels,target=/wheels \
    --mount=type=bind,source=constraints.txt,target=/tmp/constraints.txt \
    python -m venv "$VIRTUAL_ENV" \
    && pip install --no-index --find-links /wheels --constraint /tmp/constraints.txt tokenguard-stream \
    && tokenguard --version

FROM base AS demo
RUN --mount=type=bind,from=wheels,source=/wheels,target=/wheels \
    --mount=type=bind,source=constraints.txt,target=/tmp/constraints.txt \
    pip install --no-index --find-links /wheels --constraint /tmp/constraints.txt "tokenguard-stream[demo]"
WORKDIR /app
# fleet_demo.py imports localkafka (unused with KAFKA_BOOTSTRAP_SERVERS set) and starts
# examples/fleet_agent.py; its logs go to /app/.cache/demo, inside the container.
COPY examples/ examples/
COPY localkafka/ localkafka/
RUN mkdir -p /app/.cache && chown 10001:10001 /app/.cache
USER 10001:10001
ENTRYPOINT ["python", "examples/fleet_demo.py"]
CMD ["--external-aggregator", "--topic-prefix", "tokenguard."]

FROM base AS aggregator
# Inside the container the metrics endpoint (/metrics, /healthz, /readyz) listens on all
# interfaces so a port mapping reaches it; the default outside a container stays 127.0.0.1.
# (DL3064 reads "TOKEN" in TOKENGUARD_ as a secret; these are an address and a port.)
# hadolint ignore=DL3064
ENV TOKENGUARD_METRICS_HOST=0.0.0.0 \
    TOKENGUARD_METRICS_PORT=9464
EXPOSE 9464
USER 10001:10001
# Ready = owned partitions restored and lag under the threshold. No curl in a slim image: Python's
# urllib, which raises (exit 1) on a refused connection, a timeout or any non-2xx status.
HEALTHCHECK --interval=10s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('TOKENGUARD_METRICS_PORT', '9464') + '/readyz', timeout=4)"]
# Exec form: tokenguard is PID 1 and receives SIGTERM itself (it stops cleanly: commits, flushes
# its changelog, leaves the group); a shell in between would swallow the signal.
STOPSIGNAL SIGTERM
ENTRYPOINT ["tokenguard"]
CMD ["aggregator"]
