{{/* Common labels of every object the chart renders (generated ones carry app.kubernetes.io/part-of only). */}}
{{- define "keyroom.labels" -}}
app.kubernetes.io/part-of: keyroom
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | quote }}
{{- end }}

{{- define "keyroom.image" -}}
{{- $image := index .root.Values.image .component -}}
{{- printf "%s:%s" $image.repository ($image.tag | default .root.Chart.AppVersion) -}}
{{- end }}

{{/* The Secret with the token's user PIN: the user's, or the one the chart generates for SoftHSM2. */}}
{{- define "keyroom.pinSecret" -}}
{{- if .Values.signer.pinSecret -}}
{{- .Values.signer.pinSecret -}}
{{- else if .Values.signer.softhsm.initToken -}}
keyroom-hsm-pin
{{- else -}}
{{- fail "signer.pinSecret: name the Secret with the PIN of your HSM's token (key `pin`); the chart generates one only for SoftHSM2 (signer.softhsm.initToken: true)" -}}
{{- end -}}
{{- end }}

{{- define "keyroom.signerHost" -}}
{{- printf "keyroom-signer.%s.svc" .Release.Namespace -}}
{{- end }}
