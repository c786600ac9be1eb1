# syntax=docker/dockerfile:1
# Multi-stage: build with the Rust toolchain, run on a small non-root image.
FROM rust:1.95-bookworm AS build
WORKDIR /src
# build.rs sets the commit `smsgw --version` reports.
COPY Cargo.toml Cargo.lock build.rs ./
# Cargo.toml declares the throughput bench: cargo refuses a manifest whose bench file is
# missing, even to build only the binary.
COPY benches benches
# The allocator's settings (.cargo/config.toml) are part of the build.
COPY .cargo .cargo
COPY src src
COPY schema schema
# The inbox page's template and the countries that refuse alphanumeric senders,
# compiled into the binary.
COPY templates templates
COPY data data
# The image's build has no .git (.dockerignore): the commit comes as a build argument,
#   docker build --build-arg SMSGW_COMMIT=$(git rev-parse --short HEAD) .
# and `smsgw --version` says "unknown" without it.
ARG SMSGW_COMMIT
RUN cargo build --release --locked --bin smsgw && strip target/release/smsgw

# glibc and CA certificates, nothing else; runs as uid 65532.
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /src/target/release/smsgw /usr/local/bin/smsgw
USER 65532:65532
# Production unless the deployment says otherwise: the image listens beyond localhost, and
# a development daemon would migrate, consume real jobs, send nothing and show login codes
# on its inbox page. Production instead refuses to start without a real provider, its
# credentials and an https SMSGW_PUBLIC_URL. (docker-compose.yml sets development.)
ENV SMSGW_ENV=production SMSGW_HTTP_ADDR=0.0.0.0:9464 SMSGW_LOG_FORMAT=json
EXPOSE 9464
ENTRYPOINT ["/usr/local/bin/smsgw"]
CMD ["run"]
