{{/*
consentgate.yaml, rendered from values. Every path points at a mount made by the
Deployment (gateway) or by "consentgate.sidecar":
  /etc/consentgate/config          this ConfigMap (read-only)
  /etc/consentgate/consent         consent snapshot from an existing ConfigMap (read-only)
  /etc/consentgate/certs           secrets.ca (read-only)
  /etc/consentgate/secrets/<name>  the other secrets (read-only)
  /var/lib/consentgate             writable state (journal, audit)
*/}}
{{- define "consentgate.consentFilePath" -}}
{{- if .Values.config.consent.file.existingConfigMap -}}
/etc/consentgate/consent/{{ .Values.config.consent.file.key }}
{{- else -}}
/etc/consentgate/config/consent.jsonl
{{- end -}}
{{- end -}}

{{- define "consentgate.configYaml" -}}
{{- $c := .Values.config -}}
{{- $s := .Values.secrets -}}
{{- $sidecar := eq .Values.mode "sidecar" -}}
# Rendered by the consentgate Helm chart (mode: {{ .Values.mode }}). Edit values, not this file.
listen:
{{- if $sidecar }}
  proxy: 127.0.0.1:{{ .Values.ports.proxy }}
  admin: 127.0.0.1:{{ .Values.ports.admin }}    # the consent write API: the pod's own containers only
  gateway: {{ if .Values.sidecar.iptablesInit.enabled }}127.0.0.1:{{ .Values.ports.gateway }}{{ else }}null{{ end }}
{{- else }}
  proxy: 0.0.0.0:{{ .Values.ports.proxy }}
  admin: 0.0.0.0:{{ .Values.ports.admin }}
  gateway: 0.0.0.0:{{ .Values.ports.gateway }}
{{- end }}
  metrics: 0.0.0.0:{{ .Values.ports.metrics }}  # /metrics, /healthz, /readyz: kubelet probes and Prometheus reach the pod IP
unknown_destinations: {{ $c.unknownDestinations }}
interception:
  ca_cert: /etc/consentgate/certs/{{ $s.ca.certKey }}
  ca_key: /etc/consentgate/certs/{{ $s.ca.keyKey }}
upstream:
  extra_ca: {{ if $s.upstreamExtraCA.name }}/etc/consentgate/secrets/upstream-ca/{{ $s.upstreamExtraCA.key }}{{ else }}null{{ end }}
  resolve: {{ if $c.upstream.resolve }}{{ toYaml $c.upstream.resolve | nindent 4 }}{{ else }}{}{{ end }}
  connect_timeout: {{ $c.upstream.connectTimeout }}
  response_timeout: {{ $c.upstream.responseTimeout }}
  pool_idle_timeout: {{ $c.upstream.poolIdleTimeout }}
  http2: {{ $c.upstream.http2 }}
consent:
  source: {{ $c.consent.source }}
  file: {{ include "consentgate.consentFilePath" . }}
  journal: /var/lib/consentgate/consent-journal
  journal_key_file: {{ if $s.journalKey.name }}/etc/consentgate/secrets/journal-key/{{ $s.journalKey.key }}{{ else }}null{{ end }}
  max_staleness: {{ $c.consent.maxStaleness }}
  postgres:
    url: {{ $c.consent.postgres.url | quote }}
    password_file: {{ if eq $c.consent.source "postgres" }}/etc/consentgate/secrets/postgres/{{ $s.postgresPassword.key }}{{ else }}null{{ end }}
{{- if or (eq $c.consent.source "nats") $c.consent.replicateTo }}
{{- if $c.consent.replicateTo }}
  replicate_to: {{ $c.consent.replicateTo }}
{{- end }}
  nats:
    url: {{ $c.consent.nats.url | quote }}
    bucket: {{ $c.consent.nats.bucket | quote }}
    credentials_file: {{ if $s.natsCredentials.name }}/etc/consentgate/secrets/nats-creds/{{ $s.natsCredentials.key }}{{ else }}null{{ end }}
{{- if $c.consent.nats.ownerAdminUrl }}
    owner_admin_url: {{ $c.consent.nats.ownerAdminUrl | quote }}
{{- end }}
{{- end }}
admin:
  tokens_file: /etc/consentgate/secrets/admin-tokens/{{ $s.adminTokens.key }}
  ready_requires_fresh_consent: {{ if $sidecar }}{{ .Values.sidecar.readyRequiresFreshConsent }}{{ else }}{{ $c.admin.readyRequiresFreshConsent }}{{ end }}
{{- if include "consentgate.adminTls" . }}
  tls:
    cert: /etc/consentgate/secrets/admin-tls/{{ $s.adminTls.certKey }}
    key: /etc/consentgate/secrets/admin-tls/{{ $s.adminTls.keyKey }}
    {{- if $c.admin.tls.clientAuth }}
    client_ca: /etc/consentgate/secrets/admin-tls/{{ $s.adminTls.clientCaKey }}
    {{- end }}
{{- end }}
audit:
  path: /var/lib/consentgate/audit
  pseudonym_key_file: {{ if $s.pseudonymKey.name }}/etc/consentgate/secrets/pseudonym-key/{{ $s.pseudonymKey.key }}{{ else }}null{{ end }}
  max_total_bytes: {{ $c.audit.maxTotalBytes }}
max_body_bytes: {{ $c.maxBodyBytes }}
limits:
  header_read_timeout: {{ $c.limits.headerReadTimeout }}
  body_read_timeout: {{ $c.limits.bodyReadTimeout }}
  max_header_bytes: {{ $c.limits.maxHeaderBytes }}
  inflight_body_bytes: {{ $c.limits.inflightBodyBytes }}
destinations: {{ if $c.destinations }}{{ toYaml $c.destinations | nindent 2 }}{{ else }}[]{{ end }}
categories:{{ toYaml $c.categories | nindent 2 }}
log:
  level: {{ $c.logLevel }}
shutdown_grace: {{ $c.shutdownGrace }}
{{- end -}}

{{/* The ConfigMap (gateway and sidecar mode alike). */}}
{{- define "consentgate.configMap" -}}
apiVersion: v1
kind: ConfigMap
metadata:
  name: {{ include "consentgate.configMapName" . }}
  labels:
    {{- include "consentgate.labels" . | nindent 4 }}
data:
  consentgate.yaml: |
    {{- include "consentgate.configYaml" . | nindent 4 }}
  {{- if and (eq .Values.config.consent.source "file") (not .Values.config.consent.file.existingConfigMap) }}
  consent.jsonl: {{ .Values.config.consent.file.inline | quote }}
  {{- end }}
{{- end -}}
