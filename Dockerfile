# The motorpool image: one binary that runs any service (`motorpool gateway`, `motorpool cas-shard`, ...).
# Standard bases for users who can pull; see docs/ARCHITECTURE.md for building offline.
FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p motorpool && cp target/release/motorpool /motorpool

FROM debian:bookworm-slim
RUN useradd --system --home /var/lib/motorpool motorpool && mkdir -p /var/lib/motorpool && chown motorpool /var/lib/motorpool
COPY --from=build /motorpool /usr/local/bin/motorpool
USER motorpool
ENTRYPOINT ["/usr/local/bin/motorpool"]
