# The motorpool image: one binary that runs any service (`motorpool gateway`, `motorpool cas-shard`, ...).
# Standard bases (rust, debian) for users who can pull them. On a machine that cannot reach a
# registry, scripts/images makes the same image from a debootstrapped Debian with these packages.
FROM rust:1-bookworm AS build
WORKDIR /src
RUN apt-get update && apt-get install -y --no-install-recommends protobuf-compiler && rm -rf /var/lib/apt/lists/*
COPY . .
RUN cargo build --release --locked -p motorpool && cp target/release/motorpool /motorpool

FROM debian:bookworm-slim
# The fleet services call these: git, the Docker CLI, tar and e2fsprogs (image builder);
# dosfstools, mtools and GRUB's EFI modules (the drives' ESP); workers, bubblewrap (the action
# sandbox) and g++ (C++ actions); the runner, Bazel with netty-tcnative (grpcs://); wget, the
# containers' health checks. Keep scripts/images' list the same.
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates git git-lfs docker.io tar e2fsprogs \
      dosfstools mtools grub-efi-amd64-bin bubblewrap bazel-bootstrap bazel-platforms libnetty-tcnative-jni g++ wget \
      && rm -rf /var/lib/apt/lists/*
# Named volumes mounted below it take these owners: the services that run as `motorpool` write them.
RUN useradd --system --home /var/lib/motorpool motorpool \
      && mkdir -p /var/lib/motorpool/labels /var/lib/motorpool/workspaces /var/lib/motorpool/images \
      && chown -R motorpool /var/lib/motorpool
COPY --from=build /motorpool /usr/local/bin/motorpool
# The image builder needs the Docker socket, the burner the drives and workers their sandbox:
# run those as root (`user: root` in compose) where the host allows it.
USER motorpool
ENTRYPOINT ["/usr/local/bin/motorpool"]
