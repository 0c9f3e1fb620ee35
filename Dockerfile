# syntax=docker/dockerfile:1
#
# consentgate container image.
#
#   docker build -t consentgate .                                   # the proxy (default target)
#   docker build -t consentgate-iptables-init --target iptables-init .   # optional sidecar init image
#
# Runtime layout (the Helm chart in helm/consentgate mounts exactly these):
#   /etc/consentgate/config   read-only: consentgate.yaml (+ consent snapshot, when source: file)
#   /etc/consentgate/certs    read-only: interception CA (ca.pem, ca-key.pem)
#   /var/lib/consentgate      writable, the working directory: journal, audit, pseudonym key
# The process runs as uid/gid 10001 and needs no capabilities.

# Base images are pinned by digest: the tag says what it is, the digest decides what is
# pulled, so a rebuild gets the same bytes until someone bumps the pin on purpose.
# Where these digests come from: no container registry is reachable from the machine
# this was written on, so they are the digests that public Dockerfiles pinned for these
# exact tags in September-October 2026, each seen in several unrelated repositories:
#   rust:1-bookworm       sha256:93ce27a8... = rust:1.98.1-bookworm (e.g. the Dockerfile of
#                         github.com/Valtrius/thelxinoe, pinned as rust:1.98-bookworm)
#   debian:bookworm-slim  sha256:3783cc01... (the same Dockerfile, and others dated 2026-09-27)
# Before a release, refresh and verify both against the registry:
#   docker buildx imagetools inspect rust:1-bookworm        # the "Digest:" line
#   docker buildx imagetools inspect debian:bookworm-slim
# and replace the digests below (all three FROM lines).

# ---------------------------------------------------------------- builder
FROM rust:1-bookworm@sha256:93ce27a88655056a51dbdd8f5f2d7ddc071c7b0070fb288a37b5a285fc83971e AS builder
WORKDIR /src
# The whole (dockerignored) tree: Cargo must see every target the manifest names.
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin consentgate \
 && install -m 0755 target/release/consentgate /usr/local/bin/consentgate

# ------------------------------------------------- optional iptables init
# Used only by the Helm chart's sidecar.iptablesInit container, which redirects
# the pod's outbound :443 to the sidecar's gateway listener. It runs as root with
# NET_ADMIN in the init container only; the proxy image below has no iptables.
FROM debian:bookworm-slim@sha256:3783cc01769c7b2b1b83a5c5ad96c815348e28ed7da68e2e3687004faa906251 AS iptables-init
# Versions float with the Debian point release on purpose (security updates).
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends iptables \
 && rm -rf /var/lib/apt/lists/*
ENTRYPOINT ["/bin/sh", "-c"]

# ---------------------------------------------------------------- runtime
FROM debian:bookworm-slim@sha256:3783cc01769c7b2b1b83a5c5ad96c815348e28ed7da68e2e3687004faa906251 AS runtime
# ca-certificates: the web PKI bundle (also concatenated with the interception CA
# by the chart's trust-bundle init container for apps that replace their trust store).
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/*
RUN groupadd --system --gid 10001 consentgate \
 && useradd --system --uid 10001 --gid 10001 --home-dir /var/lib/consentgate \
      --no-create-home --shell /usr/sbin/nologin consentgate \
 && mkdir -p /etc/consentgate/config /etc/consentgate/certs /var/lib/consentgate \
 && chown 10001:10001 /var/lib/consentgate \
 && chmod 0750 /var/lib/consentgate
COPY --from=builder /usr/local/bin/consentgate /usr/local/bin/consentgate

USER 10001:10001
WORKDIR /var/lib/consentgate
VOLUME ["/var/lib/consentgate"]
# proxy (forward/reverse), admin (consent API), gateway (TLS by SNI), metrics (/metrics,
# /healthz, /readyz on listen.metrics, as the Helm chart configures it)
EXPOSE 15001 15000 8443 15090
ENTRYPOINT ["consentgate"]
CMD ["run", "--config", "/etc/consentgate/config/consentgate.yaml"]
