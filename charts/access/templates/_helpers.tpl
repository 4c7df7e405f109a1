{{/*
The five roles: values key, subcommand, Deployment/container/Service names (the deployment
guide's names, which `kubectl set image` and the port-forward lines depend on).
*/}}
{{- define "access.roles" -}}
gateway: {subcommand: gateway, deployment: gateway-deployment, container: gateway, service: gateway-service}
stream: {subcommand: stream, deployment: streaming-deployment, container: streaming, service: streaming-service}
auth: {subcommand: auth, deployment: auth-deployment, container: auth, service: auth-service}
entitlements: {subcommand: entitlements, deployment: entitlements-deployment, container: entitlements, service: entitlements-service}
metrics: {subcommand: metrics, deployment: metrics-deployment, container: metrics, service: metrics-service}
{{- end -}}

{{- define "access.labels" -}}
app.kubernetes.io/name: access
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "access.selector" -}}
app.kubernetes.io/name: access
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .role }}
{{- end -}}

{{- define "access.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end -}}

{{- define "access.secretName" -}}
{{ .Values.secrets.existingSecret | default "access-secrets" }}
{{- end -}}

{{/* The file the roles read with --config: routes, the topic registry, seed rules. */}}
{{- define "access.configFile" -}}
{{- $c := dict -}}
{{- if .Values.routes }}{{ $_ := set $c "gateway" (dict "routes_file" "/etc/access/routes.yaml") }}{{ end -}}
{{- $stream := dict -}}
{{- if .Values.topics }}{{ $_ := set $stream "topics" .Values.topics }}{{ end -}}
{{- if $stream }}{{ $_ := set $c "stream" $stream }}{{ end -}}
{{- if .Values.seedRules }}{{ $_ := set $c "entitlements" (dict "seed_file" "/etc/access/seed-rules.yaml") }}{{ end -}}
{{- toYaml $c -}}
{{- end -}}
