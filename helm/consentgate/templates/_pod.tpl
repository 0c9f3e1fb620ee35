{{/*
Pieces shared by the gateway Deployment and the sidecar: the proxy container and
the volumes it mounts. Context: a dict with Values and Release (see _sidecar.tpl).
*/}}

{{/* The proxy container, as one list item. */}}
{{- define "consentgate.container" -}}
{{- $sidecar := eq .Values.mode "sidecar" -}}
- name: consentgate
  image: {{ include "consentgate.image" . }}
  imagePullPolicy: {{ .Values.image.pullPolicy }}
  args: ["run", "--config", "/etc/consentgate/config/consentgate.yaml"]
  {{- if and $sidecar .Values.sidecar.native }}
  restartPolicy: Always
  {{- end }}
  ports:
    - name: {{ if $sidecar }}cg-{{ end }}proxy
      containerPort: {{ .Values.ports.proxy }}
      protocol: TCP
    {{- if not $sidecar }}
    - name: admin
      containerPort: {{ .Values.ports.admin }}
      protocol: TCP
    {{- end }}
    - name: {{ if $sidecar }}cg-{{ end }}metrics
      containerPort: {{ .Values.ports.metrics }}
      protocol: TCP
    {{- if or (not $sidecar) .Values.sidecar.iptablesInit.enabled }}
    - name: {{ if $sidecar }}cg-{{ end }}gateway
      containerPort: {{ .Values.ports.gateway }}
      protocol: TCP
    {{- end }}
  env:
    - name: RUST_LOG
      value: {{ .Values.config.logLevel | quote }}
    {{- with .Values.extraEnv }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  startupProbe:
    httpGet:
      path: /healthz
      port: {{ .Values.ports.metrics }}
    periodSeconds: {{ .Values.probes.startup.periodSeconds }}
    timeoutSeconds: {{ .Values.probes.startup.timeoutSeconds }}
    failureThreshold: {{ .Values.probes.startup.failureThreshold }}
  readinessProbe:
    httpGet:
      path: /readyz
      port: {{ .Values.ports.metrics }}
    periodSeconds: {{ .Values.probes.readiness.periodSeconds }}
    timeoutSeconds: {{ .Values.probes.readiness.timeoutSeconds }}
    failureThreshold: {{ .Values.probes.readiness.failureThreshold }}
  livenessProbe:
    httpGet:
      path: /healthz
      port: {{ .Values.ports.metrics }}
    periodSeconds: {{ .Values.probes.liveness.periodSeconds }}
    timeoutSeconds: {{ .Values.probes.liveness.timeoutSeconds }}
    failureThreshold: {{ .Values.probes.liveness.failureThreshold }}
  {{- if and (not $sidecar) .Values.gateway.preStopSleepSeconds }}
  lifecycle:
    preStop:
      sleep:
        seconds: {{ .Values.gateway.preStopSleepSeconds }}
  {{- end }}
  resources:
    {{- toYaml .Values.resources | nindent 4 }}
  securityContext:
    {{- toYaml .Values.securityContext | nindent 4 }}
  volumeMounts:
    - name: consentgate-config
      mountPath: /etc/consentgate/config
      readOnly: true
    - name: consentgate-certs
      mountPath: /etc/consentgate/certs
      readOnly: true
    - name: consentgate-admin-tokens
      mountPath: /etc/consentgate/secrets/admin-tokens
      readOnly: true
    {{- if include "consentgate.adminTls" . }}
    - name: consentgate-admin-tls
      mountPath: /etc/consentgate/secrets/admin-tls
      readOnly: true
    {{- end }}
    {{- if .Values.secrets.pseudonymKey.name }}
    - name: consentgate-pseudonym-key
      mountPath: /etc/consentgate/secrets/pseudonym-key
      readOnly: true
    {{- end }}
    {{- if .Values.secrets.journalKey.name }}
    - name: consentgate-journal-key
      mountPath: /etc/consentgate/secrets/journal-key
      readOnly: true
    {{- end }}
    {{- if .Values.secrets.natsCredentials.name }}
    - name: consentgate-nats-creds
      mountPath: /etc/consentgate/secrets/nats-creds
      readOnly: true
    {{- end }}
    {{- if eq .Values.config.consent.source "postgres" }}
    - name: consentgate-postgres
      mountPath: /etc/consentgate/secrets/postgres
      readOnly: true
    {{- end }}
    {{- if .Values.secrets.upstreamExtraCA.name }}
    - name: consentgate-upstream-ca
      mountPath: /etc/consentgate/secrets/upstream-ca
      readOnly: true
    {{- end }}
    {{- if .Values.config.consent.file.existingConfigMap }}
    - name: consentgate-consent
      mountPath: /etc/consentgate/consent
      readOnly: true
    {{- end }}
    - name: consentgate-state
      mountPath: /var/lib/consentgate
{{- end -}}

{{/* The proxy's volumes, as list items. */}}
{{- define "consentgate.volumes" -}}
{{- /* Gateway pods set fsGroup 10001, so group-readable suffices. A sidecar cannot rely
on the app pod's fsGroup: its secret files are world-readable, but only the consentgate
container mounts them (the app gets ca.pem alone, from its own volume). */ -}}
{{- $mode := ternary 0444 0440 (eq .Values.mode "sidecar") -}}
- name: consentgate-config
  configMap:
    name: {{ include "consentgate.configMapName" . }}
- name: consentgate-certs
  secret:
    secretName: {{ .Values.secrets.ca.name }}
    defaultMode: {{ $mode }}
    items:
      - key: {{ .Values.secrets.ca.certKey }}
        path: {{ .Values.secrets.ca.certKey }}
      - key: {{ .Values.secrets.ca.keyKey }}
        path: {{ .Values.secrets.ca.keyKey }}
- name: consentgate-admin-tokens
  secret:
    secretName: {{ .Values.secrets.adminTokens.name }}
    defaultMode: {{ $mode }}
{{- if include "consentgate.adminTls" . }}
{{- $t := .Values.secrets.adminTls }}
- name: consentgate-admin-tls
  secret:
    secretName: {{ $t.name }}
    defaultMode: {{ $mode }}
    items:
      - {key: {{ $t.certKey }}, path: {{ $t.certKey }}}
      - {key: {{ $t.keyKey }}, path: {{ $t.keyKey }}}
      {{- if .Values.config.admin.tls.clientAuth }}
      - {key: {{ $t.clientCaKey }}, path: {{ $t.clientCaKey }}}
      {{- end }}
{{- end }}
{{- if .Values.secrets.pseudonymKey.name }}
- name: consentgate-pseudonym-key
  secret:
    secretName: {{ .Values.secrets.pseudonymKey.name }}
    defaultMode: {{ $mode }}
{{- end }}
{{- if .Values.secrets.journalKey.name }}
- name: consentgate-journal-key
  secret:
    secretName: {{ .Values.secrets.journalKey.name }}
    defaultMode: {{ $mode }}
{{- end }}
{{- if .Values.secrets.natsCredentials.name }}
- name: consentgate-nats-creds
  secret:
    secretName: {{ .Values.secrets.natsCredentials.name }}
    defaultMode: {{ $mode }}
{{- end }}
{{- if eq .Values.config.consent.source "postgres" }}
- name: consentgate-postgres
  secret:
    secretName: {{ .Values.secrets.postgresPassword.name }}
    defaultMode: {{ $mode }}
{{- end }}
{{- if .Values.secrets.upstreamExtraCA.name }}
- name: consentgate-upstream-ca
  secret:
    secretName: {{ .Values.secrets.upstreamExtraCA.name }}
    defaultMode: 0444
{{- end }}
{{- if .Values.config.consent.file.existingConfigMap }}
- name: consentgate-consent
  configMap:
    name: {{ .Values.config.consent.file.existingConfigMap }}
{{- end }}
- name: consentgate-state
  {{- toYaml .Values.stateVolume | nindent 2 }}
{{- end -}}
