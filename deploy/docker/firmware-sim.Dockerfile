# firmware-sim image, for load tests from inside a cluster.
#   docker build -f deploy/docker/firmware-sim.Dockerfile -t plantlink/firmware-sim:0.1.0 .
FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --locked --release -p firmware-sim \
 && strip target/release/firmware-sim

FROM debian:bookworm-slim
RUN useradd --system --uid 10001 --no-create-home plantlink
COPY --from=build /src/target/release/firmware-sim /usr/local/bin/firmware-sim
USER 10001
ENTRYPOINT ["/usr/local/bin/firmware-sim"]
