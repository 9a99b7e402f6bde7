# The one image of the project: `outbox operator | relay | consume | session-api | ...`.
# Build: docker build -t outbox-operator:dev .   (make kind-deploy does this)
FROM rust:1-bookworm AS build
RUN apt-get update && apt-get install -y --no-install-recommends cmake libcurl4-openssl-dev pkg-config \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
# Dependencies first, so source edits rebuild only the crate.
COPY Cargo.toml Cargo.lock ./
RUN mkdir -p src benches && echo 'fn main() {}' > src/main.rs && touch src/lib.rs \
    && for b in session_write relay_throughput consumer_throughput; do echo 'fn main() {}' > benches/$b.rs; done \
    && cargo build --release --bin outbox || true
COPY src src
COPY schemas schemas
RUN touch src/main.rs src/lib.rs && cargo build --release --bin outbox && strip target/release/outbox \
    && mkdir -p /out && cp target/release/outbox /out/ && cp /usr/lib/*-linux-gnu/libz.so.1 /out/

# Small non-root runtime: glibc, libgcc, OpenSSL and CA certificates, no shell.
# The binary also links zlib (librdkafka), which distroless does not ship.
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /out/libz.so.1 /usr/lib/libz.so.1
COPY --from=build /out/outbox /usr/local/bin/outbox
USER 65532:65532
EXPOSE 9090
ENTRYPOINT ["/usr/local/bin/outbox"]
CMD ["--help"]
