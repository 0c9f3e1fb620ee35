{{/*
Names. They depend on the release and values only (never on .Chart), so a parent
chart that includes "consentgate.sidecar" computes the same names as this chart.
*/}}
{{/* The release name when it contains "consentgate", else "<release>-consentgate". */}}
{{- define "consentgate.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := .Values.nameOverride | default "consentgate" -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "consentgate.name" -}}
{{- .Values.nameOverride | default "consentgate" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "consentgate.configMapName" -}}
{{- printf "%s-config" (include "consentgate.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "consentgate.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- .Values.serviceAccount.name | default (include "consentgate.fullname" .) -}}
{{- else -}}
{{- .Values.serviceAccount.name | default "default" -}}
{{- end -}}
{{- end -}}

{{- define "consentgate.image" -}}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default (include "consentgate.appVersion" .)) -}}
{{- end -}}

{{/* Keep equal to appVersion in Chart.yaml (scripts/k8s-validate checks): .Chart is the
parent chart's when another chart includes "consentgate.sidecar". */}}
{{- define "consentgate.appVersion" -}}0.1.0{{- end -}}

{{- define "consentgate.selectorLabels" -}}
app.kubernetes.io/name: {{ include "consentgate.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: {{ .Values.mode }}
{{- end -}}

{{- define "consentgate.labels" -}}
{{ include "consentgate.selectorLabels" . }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: consentgate
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* Whole seconds in a duration such as 5m, 1m30s or 250ms (the forms the values schema
allows); fractions of a second are dropped. */}}
{{- define "consentgate.seconds" -}}
{{- $acc := dict "ms" 0 -}}
{{- range regexFindAll "[0-9]+(ms|s|m|h|d)" (toString .) -1 -}}
{{- $n := regexFind "^[0-9]+" . | atoi -}}
{{- $u := trimPrefix (regexFind "^[0-9]+" .) . -}}
{{- $mul := get (dict "ms" 1 "s" 1000 "m" 60000 "h" 3600000 "d" 86400000) $u -}}
{{- $_ := set $acc "ms" (add $acc.ms (mul $n $mul)) -}}
{{- end -}}
{{- div $acc.ms 1000 -}}
{{- end -}}

{{/* Whether the admin API is served over TLS (gateway mode only: sidecars keep it on loopback). */}}
{{- define "consentgate.adminTls" -}}
{{- if and (eq .Values.mode "gateway") .Values.config.admin.tls.enabled -}}true{{- end -}}
{{- end -}}

{{/* The most gateway replicas these values can run at once. */}}
{{- define "consentgate.maxReplicas" -}}
{{- if .Values.autoscaling.enabled -}}{{ .Values.autoscaling.maxReplicas }}{{- else -}}{{ .Values.gateway.replicas }}{{- end -}}
{{- end -}}

{{/* Fail early on values that cannot work (values.schema.json refuses bad types, unknown
keys and malformed durations before this runs; these are the rules across keys). */}}
{{- define "consentgate.validate" -}}
{{- if not (has .Values.mode (list "gateway" "sidecar")) -}}
{{- fail (printf "mode must be gateway or sidecar, got %q" .Values.mode) -}}
{{- end -}}
{{- if not .Values.secrets.ca.name -}}
{{- fail "secrets.ca.name: name the existing Secret holding ca.pem and ca-key.pem" -}}
{{- end -}}
{{- if not .Values.secrets.adminTokens.name -}}
{{- fail "secrets.adminTokens.name: name the existing Secret holding the admin tokens" -}}
{{- end -}}
{{- if and (include "consentgate.adminTls" .) (not .Values.secrets.adminTls.name) -}}
{{- fail "config.admin.tls.enabled: set secrets.adminTls.name to the Secret holding the admin API's tls.crt, tls.key and ca.crt (or set config.admin.tls.enabled: false)" -}}
{{- end -}}
{{- if and (eq .Values.config.consent.source "postgres") (not .Values.secrets.postgresPassword.name) -}}
{{- fail "consent.source is postgres: set secrets.postgresPassword.name" -}}
{{- end -}}
{{- if and (eq .Values.config.consent.source "nats") .Values.config.consent.replicateTo -}}
{{- fail "config.consent.replicateTo: a release whose source is nats follows the bucket; set replicateTo on the gateway (source postgres or file)" -}}
{{- end -}}
{{- if eq .Values.config.consent.source "file" -}}
{{- if not (or .Values.config.consent.file.existingConfigMap .Values.config.consent.file.inline) -}}
{{- fail "config.consent.source is file but the snapshot is empty: set config.consent.file.existingConfigMap (or .inline); with no records every event would be dropped. For a shared source use config.consent.source: postgres" -}}
{{- end -}}
{{- $max := include "consentgate.maxReplicas" . | int -}}
{{- if and (eq .Values.mode "gateway") (gt $max 1) -}}
{{- fail (printf "config.consent.source is file but the gateway can run %d replicas (gateway.replicas, or autoscaling.maxReplicas while autoscaling.enabled): each replica would keep its own consent copy and journal, so an admin-API write would reach one replica only. Use config.consent.source: postgres, or gateway.replicas: 1 with autoscaling.enabled: false" $max) -}}
{{- end -}}
{{- end -}}
{{- if and .Values.autoscaling.enabled (gt (int .Values.autoscaling.minReplicas) (int .Values.autoscaling.maxReplicas)) -}}
{{- fail "autoscaling.minReplicas is above autoscaling.maxReplicas" -}}
{{- end -}}
{{- if and .Values.sidecar.iptablesInit.enabled (eq (int .Values.sidecar.exampleApp.runAsUser) 10001) -}}
{{- fail "sidecar.exampleApp.runAsUser must not be 10001: that uid is exempt from the iptables redirect" -}}
{{- end -}}
{{- if and (eq .Values.mode "sidecar") .Values.metrics.serviceMonitor.enabled -}}
{{- fail "metrics.serviceMonitor is for the gateway; sidecars are scraped by metrics.podMonitor (one per namespace)" -}}
{{- end -}}
{{- if and (eq .Values.mode "gateway") .Values.metrics.podMonitor.enabled -}}
{{- fail "metrics.podMonitor is for sidecars; the gateway is scraped by metrics.serviceMonitor" -}}
{{- end -}}
{{- $ports := list .Values.ports.proxy .Values.ports.admin .Values.ports.gateway .Values.ports.metrics -}}
{{- if ne (len (uniq $ports)) (len $ports) -}}
{{- fail (printf "ports: proxy, admin, gateway and metrics must differ, got %v" $ports) -}}
{{- end -}}
{{- if .Values.metrics.prometheusRule.enabled -}}
{{- /* refuses a maxStaleness too short for the alerts to fire in order */ -}}
{{- $_ := include "consentgate.rules.thresholds" . -}}
{{- end -}}
{{- end -}}
