# syntax=docker/dockerfile:1
# cdn-edge: multi-stage build. docker build -t cdn-edge .

ARG RUST_VERSION=1.95

FROM rust:${RUST_VERSION}-bookworm AS build
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends cmake \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN cargo build --release --locked \
    && install -m 0755 target/release/cdn-edge /cdn-edge

FROM debian:bookworm-slim
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends ca-certificates curl \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --user-group --home-dir /var/cache/cdn-edge --shell /usr/sbin/nologin cdn-edge \
    && mkdir -p /etc/cdn-edge /var/cache/cdn-edge /var/spool/cdn-edge \
    && chown cdn-edge:cdn-edge /var/cache/cdn-edge /var/spool/cdn-edge
COPY --from=build /cdn-edge /usr/local/bin/cdn-edge
COPY conf/edge.toml /etc/cdn-edge/edge.toml
VOLUME ["/var/cache/cdn-edge", "/var/spool/cdn-edge"]
USER cdn-edge
WORKDIR /var/cache/cdn-edge
EXPOSE 8080 8443 9090
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
    CMD curl -fsS http://127.0.0.1:9090/healthz || exit 1
ENTRYPOINT ["cdn-edge"]
CMD ["serve", "--conf", "/etc/cdn-edge/edge.toml"]
