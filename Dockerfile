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

ARG RUST_VERSION=1
ARG DEBIAN_RELEASE=bookworm

# ---------------------------------------------------------------- builder
FROM rust:${RUST_VERSION}-${DEBIAN_RELEASE} AS builder
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
FROM debian:${DEBIAN_RELEASE}-slim AS iptables-init
# Versions float with the Debian point release on purpose (security updates).
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends iptables \
 && rm -rf /var/lib/apt/lists/*
ENTRYPOINT ["/bin/sh", "-c"]

# ---------------------------------------------------------------- runtime
FROM debian:${DEBIAN_RELEASE}-slim AS runtime
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
# proxy (forward/reverse), admin (/metrics, /healthz, /readyz, consent API), gateway (TLS by SNI)
EXPOSE 15001 15000 8443
ENTRYPOINT ["consentgate"]
CMD ["run", "--config", "/etc/consentgate/config/consentgate.yaml"]
