# edge-agent image, for gateways that run containers (most install the binary with systemd:
# deploy/gateway/FLASHING.md). Build for the gateway's platform with buildx, e.g.
#   docker buildx build --platform linux/arm64 -f deploy/docker/edge-agent.Dockerfile -t plantlink/edge-agent:0.1.0 .
FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --locked --release -p edge-agent \
 && strip target/release/edge-agent

FROM debian:bookworm-slim
RUN useradd --system --uid 10001 --no-create-home plantlink \
 && mkdir -p /var/lib/plantlink && chown 10001 /var/lib/plantlink
COPY --from=build /src/target/release/edge-agent /usr/local/bin/edge-agent
USER 10001
VOLUME ["/var/lib/plantlink"]
EXPOSE 5683/udp 9310/tcp
ENTRYPOINT ["/usr/local/bin/edge-agent"]
CMD ["run", "--config", "/etc/plantlink/edge-agent.toml"]
