{{/*
Alerting rules, one named template per rule group ("consentgate.rules.group.NAME");
templates/prometheusrule.yaml includes the groups that are switched on. A group over
metrics the binary does not export yet is defined here but not included there:
scripts/k8s-validate renders it anyway, runs its promtool unit tests, and fails once all
its metrics are registered in src/metrics.rs, saying to add it to prometheusrule.yaml.

Every alert carries runbook_url = metrics.prometheusRule.runbookBaseUrl#<alert, lower
case>, a section of docs/RUNBOOK.md. Every group is evaluated every
metrics.prometheusRule.interval, which the consent thresholds count on.
*/}}

{{/* PromQL matchers: w = a whole set for a bare metric, c = extra matchers inside a set,
job = the matchers of up{} for consentgate's targets. As JSON. */}}
{{- define "consentgate.rules.matchers" -}}
{{- $s := .Values.metrics.prometheusRule.selector | default "" -}}
{{- $job := printf "job=%q" .Values.metrics.job -}}
{{- dict "w" (ternary (printf "{%s}" $s) "" (ne $s "")) "c" (ternary (printf ",%s" $s) "" (ne $s "")) "job" (ternary (printf "%s,%s" $job $s) $job (ne $s "")) | toJson -}}
{{- end -}}

{{- define "consentgate.rules.runbook" -}}
{{- printf "%s#%s" .root.Values.metrics.prometheusRule.runbookBaseUrl (lower .alert) -}}
{{- end -}}

{{/*
Consent staleness thresholds, in seconds, derived from config.consent.maxStaleness (the
value the proxy enforces):
  warn = max / 2
  crit = max - scrape interval - rule interval - Alertmanager delay
A staleness past crit is seen by Prometheus at most one scrape interval later and by the
rule at most one evaluation later, and the notification leaves Alertmanager after its
group_wait: so the critical alert reaches the on-call by the time marketing traffic is
dropped (staleness > max). Refuses values where crit would not come after warn.
*/}}
{{- define "consentgate.rules.thresholds" -}}
{{- $r := .Values.metrics.prometheusRule -}}
{{- $max := include "consentgate.seconds" .Values.config.consent.maxStaleness | int -}}
{{- $scrape := include "consentgate.seconds" .Values.metrics.interval | int -}}
{{- $eval := include "consentgate.seconds" $r.interval | int -}}
{{- $am := include "consentgate.seconds" $r.alertmanagerDelay | int -}}
{{- $warn := div $max 2 -}}
{{- $crit := sub $max (add $scrape $eval $am) -}}
{{- if le $crit $warn -}}
{{- fail (printf "config.consent.maxStaleness %s is too short for the consent alerts: the critical one must fire by %ds (maxStaleness - metrics.interval %s - metrics.prometheusRule.interval %s - alertmanagerDelay %s), after the warning at half of maxStaleness (%ds). Raise maxStaleness or shorten those intervals" .Values.config.consent.maxStaleness $crit .Values.metrics.interval $r.interval $r.alertmanagerDelay $warn) -}}
{{- end -}}
{{- dict "max" $max "warn" $warn "crit" $crit | toJson -}}
{{- end -}}

{{/* ------------------------------------------------------------------ switched on */}}

{{- define "consentgate.rules.group.availability" -}}
{{- $m := include "consentgate.rules.matchers" . | fromJson -}}
{{- $up := printf "up{%s}" $m.job -}}
- name: consentgate.availability
  interval: {{ .Values.metrics.prometheusRule.interval }}
  rules:
    - alert: ConsentgateTargetDown
      expr: {{ $up }} == 0
      for: 5m
      labels:
        severity: warning
      annotations:
        summary: consentgate {{`{{ $labels.namespace }}/{{ $labels.pod }}`}} cannot be scraped
        description: >-
          Prometheus has not scraped this consentgate pod for 5 minutes: the proxy is down or
          restarting, or its metrics port is unreachable. Apps behind it cannot reach their
          vendors while it is down.
        runbook_url: {{ include "consentgate.rules.runbook" (dict "root" . "alert" "ConsentgateTargetDown") }}
    - alert: ConsentgateAllTargetsDown
      expr: sum by (namespace) ({{ $up }}) == 0
      for: 3m
      labels:
        severity: critical
      annotations:
        summary: every consentgate target in {{`{{ $labels.namespace }}`}} is down
        description: >-
          No consentgate pod in this namespace answers its scrape: egress through consentgate
          is down (apps get connection errors, nothing reaches the vendors).
        runbook_url: {{ include "consentgate.rules.runbook" (dict "root" . "alert" "ConsentgateAllTargetsDown") }}
    - alert: ConsentgateTargetsAbsent
      expr: absent({{ $up }})
      for: 10m
      labels:
        severity: critical
      annotations:
        summary: Prometheus has no consentgate target at all
        description: >-
          No series up{ {{- $m.job -}} } exists: the gateway or every sidecar pod is gone, or
          the ServiceMonitor / PodMonitor is not picked up by Prometheus. Nothing about
          consentgate is being monitored.
        runbook_url: {{ include "consentgate.rules.runbook" (dict "root" . "alert" "ConsentgateTargetsAbsent") }}
    - alert: ConsentgateMetricsAbsent
      expr: ({{ $up }} == 1) unless on (job, instance) consentgate_consent_source_up{{ $m.w }}
      for: 10m
      labels:
        severity: warning
      annotations:
        summary: consentgate {{`{{ $labels.namespace }}/{{ $labels.pod }}`}} is scraped but exports no consentgate metrics
        description: >-
          The target answers, but consentgate_consent_source_up is missing from it: something
          other than consentgate serves the metrics port, or the metric was renamed. The
          consent alerts cannot fire for this pod.
        runbook_url: {{ include "consentgate.rules.runbook" (dict "root" . "alert" "ConsentgateMetricsAbsent") }}
{{- end -}}

{{- define "consentgate.rules.group.consent" -}}
{{- $m := include "consentgate.rules.matchers" . | fromJson -}}
{{- $t := include "consentgate.rules.thresholds" . | fromJson -}}
{{- $max := .Values.config.consent.maxStaleness -}}
- name: consentgate.consent
  interval: {{ .Values.metrics.prometheusRule.interval }}
  rules:
    - alert: ConsentgateConsentSourceDown
      expr: consentgate_consent_source_up{{ $m.w }} == 0
      for: 1m
      labels:
        severity: warning
      annotations:
        summary: consentgate {{`{{ $labels.namespace }}/{{ $labels.pod }}`}} lost its consent source
        description: >-
          consentgate_consent_source_up is 0. Cached consent is still enforced; once it is
          older than max_staleness ({{ $max }}) marketing categories fail closed.
        runbook_url: {{ include "consentgate.rules.runbook" (dict "root" . "alert" "ConsentgateConsentSourceDown") }}
    - alert: ConsentgateConsentAging
      expr: consentgate_consent_staleness_seconds{{ $m.w }} > {{ $t.warn }}
      labels:
        severity: warning
      annotations:
        summary: consent on {{`{{ $labels.namespace }}/{{ $labels.pod }}`}} is {{`{{ $value | humanizeDuration }}`}} old
        description: >-
          Consent has not been confirmed by its source for half of max_staleness ({{ $max }}).
          At {{ $max }} marketing events are dropped (reason consent_stale) and a gateway
          reports not ready.
        runbook_url: {{ include "consentgate.rules.runbook" (dict "root" . "alert" "ConsentgateConsentAging") }}
    - alert: ConsentgateConsentStale
      expr: consentgate_consent_staleness_seconds{{ $m.w }} > {{ $t.crit }}
      labels:
        severity: critical
      annotations:
        summary: consent on {{`{{ $labels.namespace }}/{{ $labels.pod }}`}} is {{`{{ $value | humanizeDuration }}`}} old
        description: >-
          Marketing events are being dropped (reason consent_stale), or will be within
          {{ sub $t.max $t.crit }}s: consent is older than max_staleness ({{ $max }}). Treatment
          communications go on with the last known consent; a gateway reports not ready.
        runbook_url: {{ include "consentgate.rules.runbook" (dict "root" . "alert" "ConsentgateConsentStale") }}
{{- end -}}

{{- define "consentgate.rules.group.traffic" -}}
{{- $m := include "consentgate.rules.matchers" . | fromJson -}}
{{- $r := .Values.metrics.prometheusRule -}}
{{- $by := "sum by (namespace, destination)" -}}
- name: consentgate.traffic
  interval: {{ $r.interval }}
  rules:
    - alert: ConsentgateUpstreamErrorRate
      expr: |
        (
          {{ $by }} (rate(consentgate_upstream_errors_total{{ $m.w }}[5m]))
          /
          {{ $by }} (rate(consentgate_requests_total{{ $m.w }}[5m]))
        ) > {{ $r.upstreamErrorRatio }}
      for: 10m
      labels:
        severity: warning
      annotations:
        summary: >-
          {{`{{ $labels.destination }}`}}: {{`{{ $value | humanizePercentage }}`}} of requests fail upstream
        description: >-
          Upstream errors (connect, tls, timeout, reset, protocol) per request for one
          destination; apps see 502/504.
        runbook_url: {{ include "consentgate.rules.runbook" (dict "root" . "alert" "ConsentgateUpstreamErrorRate") }}
    - alert: ConsentgateBlockedRateSpike
      expr: |
        (
          {{ $by }} (rate(consentgate_requests_total{decision="blocked"{{ $m.c }}}[10m]))
          /
          {{ $by }} (rate(consentgate_requests_total{{ $m.w }}[10m]))
        )
        > {{ $r.blockedSpikeFactor }} * (
          {{ $by }} (rate(consentgate_requests_total{decision="blocked"{{ $m.c }}}[1d] offset 10m))
          /
          {{ $by }} (rate(consentgate_requests_total{{ $m.w }}[1d] offset 10m))
        )
        and
        {{ $by }} (rate(consentgate_requests_total{decision="blocked"{{ $m.c }}}[10m])) > {{ $r.blockedSpikeMinRate }}
      for: 15m
      labels:
        severity: warning
      annotations:
        summary: >-
          {{`{{ $labels.destination }}`}}: blocked share is {{ $r.blockedSpikeFactor }}x the previous day's
        description: >-
          A sudden rise in blocked requests: a consent source problem, a config change,
          or an app sending a new payload shape. consentgate_events_total by reason says which.
        runbook_url: {{ include "consentgate.rules.runbook" (dict "root" . "alert" "ConsentgateBlockedRateSpike") }}
{{- end -}}

{{- define "consentgate.rules.group.integrity" -}}
{{- $m := include "consentgate.rules.matchers" . | fromJson -}}
- name: consentgate.integrity
  interval: {{ .Values.metrics.prometheusRule.interval }}
  rules:
    - alert: ConsentgateAuditWriteFailures
      expr: increase(consentgate_audit_write_failures_total{{ $m.w }}[5m]) > 0
      labels:
        severity: critical
      annotations:
        summary: consentgate {{`{{ $labels.namespace }}/{{ $labels.pod }}`}} cannot write audit records
        description: >-
          Requests whose audit record cannot be written fail closed. Check the
          /var/lib/consentgate volume (full, read-only).
        runbook_url: {{ include "consentgate.rules.runbook" (dict "root" . "alert" "ConsentgateAuditWriteFailures") }}
    - alert: ConsentgateUpstreamTLSFailures
      expr: sum by (namespace, destination) (increase(consentgate_upstream_errors_total{kind="tls"{{ $m.c }}}[10m])) > 0
      labels:
        severity: warning
      annotations:
        summary: >-
          {{`{{ $labels.destination }}`}}: upstream TLS handshakes fail
        description: >-
          consentgate could not verify or negotiate TLS with the destination
          (certificate change, interception by another proxy, missing upstream.extra_ca).
        runbook_url: {{ include "consentgate.rules.runbook" (dict "root" . "alert" "ConsentgateUpstreamTLSFailures") }}
    - alert: ConsentgateConfigReloadFailed
      expr: increase(consentgate_config_reloads_total{result="failure"{{ $m.c }}}[10m]) > 0
      labels:
        severity: warning
      annotations:
        summary: consentgate {{`{{ $labels.namespace }}/{{ $labels.pod }}`}} refused a config reload
        description: The old configuration stays in force; the pod log names the key and line.
        runbook_url: {{ include "consentgate.rules.runbook" (dict "root" . "alert" "ConsentgateConfigReloadFailed") }}
{{- end -}}

{{/* ------------------------------------------- waiting for metrics (not yet included) */}}

{{/* Needs consentgate_tls_handshake_failures_total{side,reason} (SPEC §9) and
consentgate_tls_mint_failures_total (issue 20 item 4). */}}
{{- define "consentgate.rules.group.tls" -}}
{{- $m := include "consentgate.rules.matchers" . | fromJson -}}
{{- $r := .Values.metrics.prometheusRule -}}
- name: consentgate.tls
  interval: {{ $r.interval }}
  rules:
    - alert: ConsentgateTLSHandshakeFailures
      expr: sum by (namespace, pod, side, reason) (rate(consentgate_tls_handshake_failures_total{{ $m.w }}[5m])) > {{ $r.tlsHandshakeFailureRate }}
      for: 10m
      labels:
        severity: warning
      annotations:
        summary: >-
          consentgate {{`{{ $labels.namespace }}/{{ $labels.pod }}`}}: {{`{{ $value | humanize }}`}}/s TLS handshakes fail ({{`{{ $labels.side }}`}}, {{`{{ $labels.reason }}`}})
        description: >-
          side=client: apps reject the interception certificate (they do not trust the
          consentgate CA, or pin the vendor's certificate); side=upstream: the vendor's
          certificate does not verify. The pod log names SNI and peer of each failure.
        runbook_url: {{ include "consentgate.rules.runbook" (dict "root" . "alert" "ConsentgateTLSHandshakeFailures") }}
    - alert: ConsentgateCertificateMintFailures
      expr: sum by (namespace, pod) (rate(consentgate_tls_mint_failures_total{{ $m.w }}[5m])) > 0
      for: 5m
      labels:
        severity: critical
      annotations:
        summary: consentgate {{`{{ $labels.namespace }}/{{ $labels.pod }}`}} cannot mint interception certificates
        description: >-
          Every intercepted connection to a host without a cached certificate fails: the
          interception CA is unusable (expired, key mismatch, name constraints).
        runbook_url: {{ include "consentgate.rules.runbook" (dict "root" . "alert" "ConsentgateCertificateMintFailures") }}
{{- end -}}

{{/* Needs consentgate_guard_interventions_total{destination,reason} (SPEC §6, §9). */}}
{{- define "consentgate.rules.group.guard" -}}
{{- $m := include "consentgate.rules.matchers" . | fromJson -}}
{{- $r := .Values.metrics.prometheusRule -}}
- name: consentgate.guard
  interval: {{ $r.interval }}
  rules:
    - alert: ConsentgateGuardInterventions
      expr: |
        (
          sum by (namespace, destination, reason) (rate(consentgate_guard_interventions_total{{ $m.w }}[30m]))
          / on (namespace, destination) group_left
          sum by (namespace, destination) (rate(consentgate_requests_total{{ $m.w }}[30m]))
        ) > {{ $r.guardInterventionRatio }}
      for: 15m
      labels:
        severity: warning
      annotations:
        summary: >-
          {{`{{ $labels.destination }}`}}: the egress guard intervenes in {{`{{ $value | humanizePercentage }}`}} of requests ({{`{{ $labels.reason }}`}})
        description: >-
          An app sends identifiers where the adapter does not expect them (foreign
          identifiers, unknown shapes, stray emails or phones). The guard stops them, but the
          app is sending data it should not: find it and fix it.
        runbook_url: {{ include "consentgate.rules.runbook" (dict "root" . "alert" "ConsentgateGuardInterventions") }}
{{- end -}}

{{/* Needs consentgate_sync_lag_seconds (SPEC §9, §13). */}}
{{- define "consentgate.rules.group.sync" -}}
{{- $m := include "consentgate.rules.matchers" . | fromJson -}}
{{- $r := .Values.metrics.prometheusRule -}}
- name: consentgate.sync
  interval: {{ $r.interval }}
  rules:
    - alert: ConsentgateSyncLagging
      expr: consentgate_sync_lag_seconds{{ $m.w }} > {{ include "consentgate.seconds" $r.syncLagWarning }}
      for: 5m
      labels:
        severity: warning
      annotations:
        summary: >-
          consentgate {{`{{ $labels.namespace }}/{{ $labels.pod }}`}}: an opt-out has waited {{`{{ $value | humanizeDuration }}`}} for delivery to a vendor
        description: >-
          The oldest opt-out in the sync outbox is older than {{ $r.syncLagWarning }}: vendor-run
          campaigns may still reach a patient who opted out. Deliveries are retried.
        runbook_url: {{ include "consentgate.rules.runbook" (dict "root" . "alert" "ConsentgateSyncLagging") }}
    - alert: ConsentgateSyncStalled
      expr: consentgate_sync_lag_seconds{{ $m.w }} > {{ include "consentgate.seconds" $r.syncLagCritical }}
      for: 5m
      labels:
        severity: critical
      annotations:
        summary: >-
          consentgate {{`{{ $labels.namespace }}/{{ $labels.pod }}`}}: an opt-out has waited {{`{{ $value | humanizeDuration }}`}} for delivery to a vendor
        description: >-
          The oldest opt-out in the sync outbox is older than {{ $r.syncLagCritical }}: a
          vendor target has been refusing or unreachable for a long time.
        runbook_url: {{ include "consentgate.rules.runbook" (dict "root" . "alert" "ConsentgateSyncStalled") }}
{{- end -}}
