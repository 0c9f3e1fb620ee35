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

{{/* Fail early on values that cannot work. */}}
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
{{- if and (eq .Values.config.consent.source "postgres") (not .Values.secrets.postgresPassword.name) -}}
{{- fail "consent.source is postgres: set secrets.postgresPassword.name" -}}
{{- end -}}
{{- if and .Values.sidecar.iptablesInit.enabled (eq (int .Values.sidecar.exampleApp.runAsUser) 10001) -}}
{{- fail "sidecar.exampleApp.runAsUser must not be 10001: that uid is exempt from the iptables redirect" -}}
{{- end -}}
{{- end -}}
