# syntax=docker/dockerfile:1
# rnnserve: one image with the `rnnserve` CLI for every role in docker-compose.yml
# (train, archive, grpc, torchserve). Build: `docker compose build` or `docker build -t rnnserve .`

# Pinned tag: bookworm is the Debian release that still ships the Java 17 TorchServe 0.12 needs.
ARG PYTHON_IMAGE=python:3.11.13-slim-bookworm

# ---- build stage: a virtualenv with the project and its pinned dependencies -----------------------
FROM ${PYTHON_IMAGE} AS build

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH
RUN python -m venv /opt/venv

# The native core (serving/core) compiles against Debian's gRPC C++ and protobuf, as `make setup`
# installs them; only this stage has compilers.
# hadolint ignore=DL3008
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
       g++ cmake pkg-config libssl-dev libgrpc++-dev protobuf-compiler-grpc libprotobuf-dev \
       protobuf-compiler libhiredis-dev \
    && rm -rf /var/lib/apt/lists/*

# The same two steps as `make setup`: torch first by its exact pin, then the project itself.
# Here pip must take the CPU wheel explicitly (the default index would pull a CUDA build); the
# extra index applies to this one command only. Its own layer, so source edits don't refetch torch.
RUN --mount=type=cache,target=/root/.cache/pip \
    pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu

WORKDIR /src
COPY pyproject.toml README.md ./
COPY protos ./protos
COPY training ./training
COPY serving ./serving
# Not editable and without the dev extras: the runtime image needs neither. The package's own
# build (scikit-build-core + CMake) compiles the native core into serving/core/_native.
RUN --mount=type=cache,target=/root/.cache/pip \
    pip install .

# ---- runtime stage: the venv, the core's shared libraries, Java 17 for TorchServe, no compilers ---
FROM ${PYTHON_IMAGE} AS runtime

# TorchServe's frontend is Java; the headless JRE is all it needs. Not pinned to a Debian revision
# (DL3008): bookworm's security updates replace old revisions, which would break rebuilds.
# The JRE's post-install links man pages, whose folder slim images leave out.
# hadolint ignore=DL3008
RUN mkdir -p /usr/share/man/man1 \
    && apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
       openjdk-17-jre-headless libgrpc++1.51 libprotobuf32 libhiredis0.14 \
    && rm -rf /var/lib/apt/lists/*

# A fixed, unprivileged UID so volume ownership is predictable across rebuilds.
RUN groupadd --system --gid 10001 rnnserve \
    && useradd --system --uid 10001 --gid rnnserve --create-home --home-dir /home/rnnserve rnnserve \
    && mkdir -p /models \
    && chown rnnserve:rnnserve /models

COPY --from=build /opt/venv /opt/venv

# /models is the mount point of the `model_store` volume; a fresh named volume takes this
# directory's owner, so the unprivileged user can write into it.
ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    MPLBACKEND=Agg \
    MPLCONFIGDIR=/tmp/matplotlib \
    RNNSERVE_STORE=/models

USER 10001:10001
WORKDIR /home/rnnserve
VOLUME ["/models"]
EXPOSE 50051 9090 8080 8082

# Default role: the gRPC service. docker-compose.yml sets each service's own command and healthcheck.
HEALTHCHECK --interval=10s --timeout=5s --start-period=60s --retries=3 \
    CMD ["rnnserve", "health", "--address", "127.0.0.1:50051"]
CMD ["rnnserve", "serve", "--store", "/models", "--address", "0.0.0.0:50051", \
     "--metrics-port", "9090", "--metrics-address", "0.0.0.0"]
