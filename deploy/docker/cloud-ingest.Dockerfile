# cloud-ingest image: build with the workspace, run on a slim Debian.
#   docker build -f deploy/docker/cloud-ingest.Dockerfile -t plantlink/cloud-ingest:0.1.0 .
FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --locked --release -p cloud-ingest \
 && strip target/release/cloud-ingest

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --no-create-home plantlink
COPY --from=build /src/target/release/cloud-ingest /usr/local/bin/cloud-ingest
USER 10001
# QUIC (UDP), the query API, Prometheus metrics.
EXPOSE 4433/udp 8080/tcp 9320/tcp
ENTRYPOINT ["/usr/local/bin/cloud-ingest"]
CMD ["run", "--config", "/etc/plantlink/cloud-ingest.toml"]
