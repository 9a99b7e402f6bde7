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
RUN touch src/main.rs src/lib.rs && cargo build --release --bin outbox && strip target/release/outbox

# Small non-root runtime: glibc + libgcc + CA certificates, no shell.
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /src/target/release/outbox /usr/local/bin/outbox
USER 65532:65532
EXPOSE 9090
ENTRYPOINT ["/usr/local/bin/outbox"]
CMD ["--help"]
