{{/*
consentgate.sidecar: put the consentgate proxy into any pod spec.

Usage, in a chart that depends on this one (Chart.yaml dependencies: consentgate,
with `consentgate.mode: sidecar` in its values so this chart renders the sidecar's
ConfigMap under the same release):

  metadata:
    labels:
      {{- include "consentgate.sidecar" (dict "root" $ "part" "podLabels") | nindent 8 }}
    annotations:
      {{- include "consentgate.sidecar" (dict "root" $ "part" "podAnnotations") | nindent 8 }}
  spec:
    initContainers:
      {{- include "consentgate.sidecar" (dict "root" $ "part" "initContainers") | nindent 6 }}
    containers:
      - name: app
        env:
          {{- include "consentgate.sidecar" (dict "root" $ "part" "appEnv") | nindent 10 }}
        volumeMounts:
          {{- include "consentgate.sidecar" (dict "root" $ "part" "appVolumeMounts") | nindent 10 }}
      {{- include "consentgate.sidecar" (dict "root" $ "part" "containers") | nindent 6 }}
    volumes:
      {{- include "consentgate.sidecar" (dict "root" $ "part" "volumes") | nindent 6 }}

Arguments (a dict):
  root    the caller's top-level context ($)
  part    podLabels | podAnnotations | initContainers | containers | volumes |
          appEnv | appVolumeMounts   (list parts render list items, possibly none)
  values  optional: the consentgate values; default .Values.consentgate of the caller
          when it has that key (subchart), else the caller's .Values (this chart)

Parts that can be empty render nothing, so keep the enclosing key (initContainers:,
containers:) valid: with sidecar.native (default) "containers" is empty, and
"initContainers" always holds at least the proxy.
*/}}
{{- define "consentgate.sidecar" -}}
{{- $root := required "consentgate.sidecar: pass (dict \"root\" $ \"part\" ...)" .root -}}
{{- $v := .values -}}
{{- if not $v -}}
{{- $v = ternary $root.Values.consentgate $root.Values (hasKey $root.Values "consentgate") -}}
{{- end -}}
{{- if ne $v.mode "sidecar" -}}
{{- fail "consentgate.sidecar: set mode: sidecar in the consentgate values (consentgate.mode when it is a subchart)" -}}
{{- end -}}
{{- $ctx := dict "Values" $v "Release" $root.Release -}}
{{- $part := required "consentgate.sidecar: part is required" .part -}}
{{- if has $part (list "podLabels" "podAnnotations" "initContainers" "containers" "volumes" "appEnv" "appVolumeMounts") -}}
{{- include (printf "consentgate.sidecar.%s" $part) $ctx -}}
{{- else -}}
{{- fail (printf "consentgate.sidecar: unknown part %q" $part) -}}
{{- end -}}
{{- end -}}

{{- define "consentgate.sidecar.podLabels" -}}
{{- toYaml .Values.sidecar.podLabels -}}
{{- end -}}

{{- define "consentgate.sidecar.podAnnotations" -}}
checksum/consentgate-config: {{ include "consentgate.configYaml" . | sha256sum }}
{{- end -}}

{{- define "consentgate.sidecar.trustBundlePath" -}}
{{- if .Values.sidecar.appTrust.combinedBundle -}}
{{ .Values.sidecar.appTrust.bundleMountPath }}/bundle.pem
{{- else -}}
{{ .Values.sidecar.appTrust.caMountPath }}/ca.pem
{{- end -}}
{{- end -}}

{{- define "consentgate.sidecar.initContainers" -}}
{{- $t := .Values.sidecar.appTrust -}}
{{- if .Values.sidecar.iptablesInit.enabled }}
{{- $i := .Values.sidecar.iptablesInit }}
# Redirects the pod's outbound TCP 443 to the sidecar's gateway listener. Runs as
# root with NET_ADMIN, in this init container only; uid 10001 (consentgate) is exempt.
- name: consentgate-iptables
  image: {{ printf "%s:%s" $i.image.repository ($i.image.tag | default (include "consentgate.appVersion" .)) }}
  imagePullPolicy: {{ $i.image.pullPolicy }}
  command: ["/bin/sh", "-c"]
  args:
    - |
      set -eu
      {{- range $i.excludeCidrs }}
      iptables -t nat -A OUTPUT -p tcp --dport 443 -d {{ . }} -j RETURN
      {{- end }}
      iptables -t nat -A OUTPUT -p tcp --dport 443 -m owner ! --uid-owner 10001 -j REDIRECT --to-ports {{ .Values.ports.gateway }}
      iptables -t nat -S OUTPUT
  resources:
    requests: {cpu: 10m, memory: 16Mi}
    limits: {memory: 32Mi}
  securityContext:
    runAsUser: 0
    runAsGroup: 0
    runAsNonRoot: false
    allowPrivilegeEscalation: false
    readOnlyRootFilesystem: true
    privileged: false
    capabilities:
      drop: [ALL]
      add: {{ toJson $i.capabilities }}
    seccompProfile:
      type: RuntimeDefault
  volumeMounts:
    - name: consentgate-iptables-run     # xtables lock file; the root filesystem is read-only
      mountPath: /run
{{- end }}
{{- if $t.combinedBundle }}
# Web PKI roots + the interception CA, for apps whose SSL_CERT_FILE replaces their trust store.
- name: consentgate-trust-bundle
  image: {{ include "consentgate.image" . }}
  imagePullPolicy: {{ .Values.image.pullPolicy }}
  command: ["/bin/sh", "-c"]
  args:
    - cat /etc/ssl/certs/ca-certificates.crt {{ $t.caMountPath }}/ca.pem > {{ $t.bundleMountPath }}/bundle.pem
  resources:
    requests: {cpu: 10m, memory: 16Mi}
    limits: {memory: 32Mi}
  securityContext:
    {{- toYaml .Values.securityContext | nindent 4 }}
  volumeMounts:
    - name: consentgate-ca-public
      mountPath: {{ $t.caMountPath }}
      readOnly: true
    - name: consentgate-trust
      mountPath: {{ $t.bundleMountPath }}
{{- end }}
{{- if .Values.sidecar.native }}
{{ include "consentgate.container" . }}
{{- end }}
{{- end -}}

{{- define "consentgate.sidecar.containers" -}}
{{- if not .Values.sidecar.native }}
{{ include "consentgate.container" . }}
{{- end }}
{{- end -}}

{{- define "consentgate.sidecar.volumes" -}}
{{ include "consentgate.volumes" . }}
# ca.pem (and the JVM truststore) only, never the key, for the app's trust store.
- name: consentgate-ca-public
  secret:
    secretName: {{ .Values.secrets.ca.name }}
    defaultMode: 0444
    items:
      - key: {{ .Values.secrets.ca.certKey }}
        path: ca.pem
      {{- if and .Values.sidecar.jvm.enabled .Values.sidecar.jvm.trustStore }}
      - key: {{ required "sidecar.jvm.trustStore: set secrets.ca.truststoreKey (the Secret key holding truststore.p12 from consentgate ca init)" .Values.secrets.ca.truststoreKey }}
        path: truststore.p12
      {{- end }}
{{- if .Values.sidecar.appTrust.combinedBundle }}
- name: consentgate-trust
  emptyDir:
    sizeLimit: 2Mi
{{- end }}
{{- if .Values.sidecar.iptablesInit.enabled }}
- name: consentgate-iptables-run
  emptyDir:
    medium: Memory
    sizeLimit: 1Mi
{{- end }}
{{- end -}}

{{- define "consentgate.sidecar.appEnv" -}}
{{- $proxy := printf "http://127.0.0.1:%v" .Values.ports.proxy -}}
{{- $noProxy := join "," .Values.sidecar.noProxy -}}
{{- $bundle := include "consentgate.sidecar.trustBundlePath" . -}}
- name: HTTPS_PROXY
  value: {{ $proxy | quote }}
- name: HTTP_PROXY
  value: {{ $proxy | quote }}
- name: https_proxy
  value: {{ $proxy | quote }}
- name: http_proxy
  value: {{ $proxy | quote }}
- name: NO_PROXY
  value: {{ $noProxy | quote }}
- name: no_proxy
  value: {{ $noProxy | quote }}
- name: SSL_CERT_FILE
  value: {{ $bundle | quote }}
- name: REQUESTS_CA_BUNDLE
  value: {{ $bundle | quote }}
- name: CURL_CA_BUNDLE
  value: {{ $bundle | quote }}
- name: NODE_EXTRA_CA_CERTS
  value: {{ printf "%s/ca.pem" .Values.sidecar.appTrust.caMountPath | quote }}
{{- if .Values.sidecar.node.useEnvProxy }}
- name: NODE_USE_ENV_PROXY
  value: "1"
{{- end }}
{{- with .Values.sidecar.jvm }}
{{- if .enabled }}
{{- $opts := list (printf "-Dhttps.proxyHost=127.0.0.1 -Dhttps.proxyPort=%v -Dhttp.proxyHost=127.0.0.1 -Dhttp.proxyPort=%v" $.Values.ports.proxy $.Values.ports.proxy) }}
{{- if .nonProxyHosts }}
{{- $opts = append $opts (printf "-Dhttp.nonProxyHosts=%s" (join "|" .nonProxyHosts)) }}
{{- end }}
{{- if .trustStore }}
{{- $opts = append $opts (printf "-Djavax.net.ssl.trustStore=%s/truststore.p12 -Djavax.net.ssl.trustStoreType=PKCS12" $.Values.sidecar.appTrust.caMountPath) }}
{{- if .trustStorePassword }}
{{- $opts = append $opts (printf "-Djavax.net.ssl.trustStorePassword=%s" .trustStorePassword) }}
{{- end }}
{{- end }}
{{- if .extraOptions }}
{{- $opts = append $opts .extraOptions }}
{{- end }}
- name: JAVA_TOOL_OPTIONS
  value: {{ join " " $opts | quote }}
{{- end }}
{{- end }}
{{- end -}}

{{- define "consentgate.sidecar.appVolumeMounts" -}}
- name: consentgate-ca-public
  mountPath: {{ .Values.sidecar.appTrust.caMountPath }}
  readOnly: true
{{- if .Values.sidecar.appTrust.combinedBundle }}
- name: consentgate-trust
  mountPath: {{ .Values.sidecar.appTrust.bundleMountPath }}
  readOnly: true
{{- end }}
{{- end -}}
