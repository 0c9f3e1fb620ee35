{{/* Egress rule pieces for networkpolicy.yaml; context: .Values.networkPolicy. */}}
{{- define "consentgate.np.dns" -}}
- to:
    - namespaceSelector:
        {{- toYaml .dns.namespaceSelector | nindent 8 }}
      podSelector:
        {{- toYaml .dns.podSelector | nindent 8 }}
  ports:
    - {protocol: UDP, port: 53}
    - {protocol: TCP, port: 53}
{{- end }}
{{- define "consentgate.np.internet" -}}
- to:
    - ipBlock:
        cidr: {{ .internetCidr }}
        {{- with .internetExcept }}
        except:
          {{- toYaml . | nindent 10 }}
        {{- end }}
  ports:
    - {protocol: TCP, port: 443}
{{- end }}
