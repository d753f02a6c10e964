# syntax=docker/dockerfile:1
# cdn-edge: multi-stage build (needs BuildKit, the default builder since Docker 23).
#
#   docker build -t cdn-edge .
#   docker run -d --name cdn-edge --stop-timeout 30 -p 8080:8080 \
#     -v "$PWD/edge.toml:/etc/cdn-edge/edge.toml:ro" \
#     -v cdn-edge-cache:/var/cache/cdn-edge -v cdn-edge-spool:/var/spool/cdn-edge cdn-edge
#
# More in docs/deployment.md.

ARG RUST_VERSION=1.95

FROM rust:${RUST_VERSION}-bookworm AS build
# cmake builds zlib-ng (flate2); the rest of the toolchain is in the image.
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends cmake \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
# The registry and target/ live in build caches, so a rebuild after a source change
# recompiles only what changed. The binary is copied out of the cache in the same step.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target,sharing=locked \
    cargo build --release --locked --bin cdn-edge \
    && install -m 0755 target/release/cdn-edge /cdn-edge

FROM debian:bookworm-slim
LABEL org.opencontainers.image.title="cdn-edge" \
      org.opencontainers.image.description="Edge CDN node for video services" \
      org.opencontainers.image.licenses="Apache-2.0"
# A fixed numeric user, so that bind-mounted directories can be chowned to it on the
# host and orchestrators can check that the image runs as non-root.
ARG CDN_EDGE_UID=10001
ARG CDN_EDGE_GID=10001
# ca-certificates: https origins and upstreams. curl: the HEALTHCHECK.
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends ca-certificates curl \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid "${CDN_EDGE_GID}" cdn-edge \
    && useradd --system --no-log-init --uid "${CDN_EDGE_UID}" --gid cdn-edge \
        --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin cdn-edge \
    && install -d -m 0755 /etc/cdn-edge \
    && install -d -m 0750 -o cdn-edge -g cdn-edge /var/cache/cdn-edge /var/spool/cdn-edge /run/cdn-edge
COPY --from=build /cdn-edge /usr/local/bin/cdn-edge
# A starting point only: mount your own file over it (its signing secret is a placeholder).
COPY conf/edge.toml /etc/cdn-edge/edge.toml
ENV CDN_EDGE_LOG=info \
    NO_COLOR=1
# Disk tier (cache.disk.path) and forwarding spool (forward.spool_dir).
VOLUME ["/var/cache/cdn-edge", "/var/spool/cdn-edge"]
USER ${CDN_EDGE_UID}:${CDN_EDGE_GID}
# The binary starts on this base image and the shipped configuration is valid.
RUN cdn-edge check-config /etc/cdn-edge/edge.toml
WORKDIR /var/cache/cdn-edge
# 8080 public HTTP, 8443 public HTTPS (reserved), 9090 admin (/metrics, /healthz, /status).
EXPOSE 8080 8443 9090
# SIGTERM is the graceful stop: in-flight responses get [server] grace_period_secs +
# shutdown_timeout_secs (5 + 5 s by default) and the spool is flushed. Docker's default
# stop timeout is 10 s, so run with --stop-timeout 30 (or docker stop -t 30).
STOPSIGNAL SIGTERM
# The admin listener must listen on 127.0.0.1:9090 or 0.0.0.0:9090 inside the container.
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
    CMD curl -fsS --max-time 2 http://127.0.0.1:9090/healthz || exit 1
ENTRYPOINT ["cdn-edge"]
CMD ["serve", "--conf", "/etc/cdn-edge/edge.toml"]
