{{/* Chart name, truncated to 63 characters. */}}
{{- define "fairlane.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Fully qualified app name; components append "-auth", "-queue", ... */}}
{{- define "fairlane.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 50 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 50 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 50 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "fairlane.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "fairlane.labels" -}}
helm.sh/chart: {{ include "fairlane.chart" . }}
app.kubernetes.io/name: {{ include "fairlane.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: fairlane
{{- end }}

{{/* Selector labels of one component: include "fairlane.selectorLabels" (list $ "queue") */}}
{{- define "fairlane.selectorLabels" -}}
{{- $root := index . 0 -}}
app.kubernetes.io/name: {{ include "fairlane.name" $root }}
app.kubernetes.io/instance: {{ $root.Release.Name }}
app.kubernetes.io/component: {{ index . 1 }}
{{- end }}

{{- define "fairlane.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{- define "fairlane.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "fairlane.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "fairlane.secretName" -}}
{{- default (include "fairlane.fullname" .) .Values.secret.existingSecret }}
{{- end }}

{{/* One probe on grpc.health.v1 service $service of port $port: the kubelet's gRPC probe,
or the image's health-check script when the port speaks TLS. */}}
{{- define "fairlane.probe" -}}
{{- $root := index . 0 -}}
{{- $port := index . 1 -}}
{{- $service := index . 2 -}}
{{- if $root.Values.tls.enabled }}
exec:
  command: ["fairlane-healthcheck", "--timeout", "2", {{ printf "127.0.0.1:%v" $port | quote }}, {{ $service | quote }}]
{{- else }}
grpc:
  port: {{ $port }}
  service: {{ $service }}
{{- end }}
{{- end }}

{{/* The fixed facts of each service: gRPC port, metrics port, gRPC service name. */}}
{{- define "fairlane.components" -}}
auth:
  grpcPort: 50051
  metricsPort: 9101
  grpcService: fairlane.auth.v1.AuthService
queue:
  grpcPort: 50052
  metricsPort: 9102
  grpcService: fairlane.queue.v1.QueueService
worker:
  grpcPort: 50053
  metricsPort: 9103
  grpcService: fairlane.worker.v1.WorkerService
{{- end }}

{{/* The chart-managed Secret as the cluster has it (empty at install and offline). */}}
{{- define "fairlane.existingChartSecret" -}}
{{- lookup "v1" "Secret" .Release.Namespace (include "fairlane.fullname" .) | toJson -}}
{{- end }}

{{/* Secret data of the chart-managed Secret. */}}
{{- define "fairlane.secretData" -}}
{{- $serviceSecret := .Values.secret.serviceSecret -}}
{{- if not $serviceSecret -}}
{{- $existing := include "fairlane.existingChartSecret" . | fromJson -}}
{{- if and $existing $existing.data (hasKey $existing.data "FAIRLANE_SERVICE_SECRET") -}}
{{- $serviceSecret = index $existing.data "FAIRLANE_SERVICE_SECRET" | b64dec -}}
{{- else -}}
{{- $serviceSecret = randAlphaNum 48 -}}
{{- end -}}
{{- end -}}
FAIRLANE_DATABASE_URL: {{ .Values.secret.databaseUrl | b64enc | quote }}
FAIRLANE_BROKER_URL: {{ .Values.secret.brokerUrl | b64enc | quote }}
FAIRLANE_SERVICE_SECRET: {{ $serviceSecret | b64enc | quote }}
{{- end }}

{{/* Non-secret settings shared by every service (the ConfigMap's data). */}}
{{- define "fairlane.configData" -}}
{{- $fullname := include "fairlane.fullname" . -}}
FAIRLANE_DATABASE_SCHEMA: {{ .Values.settings.databaseSchema | quote }}
FAIRLANE_LANE_MAX_LENGTH: {{ .Values.settings.laneMaxLength | toString | quote }}
FAIRLANE_LANE_QUEUE_TYPE: {{ .Values.rabbitmq.laneQueueType | quote }}
FAIRLANE_GRACE_SECONDS: {{ .Values.settings.graceSeconds | toString | quote }}
FAIRLANE_CONCURRENCY: {{ .Values.settings.concurrency | toString | quote }}
FAIRLANE_AUTH_LISTEN: "0.0.0.0:50051"
FAIRLANE_QUEUE_LISTEN: "0.0.0.0:50052"
FAIRLANE_WORKER_LISTEN: "0.0.0.0:50053"
FAIRLANE_AUTH_TARGET: {{ printf "%s-auth:50051" $fullname | quote }}
FAIRLANE_QUEUE_TARGET: {{ printf "dns:///%s-queue-headless:50052" $fullname | quote }}
FAIRLANE_AUTH_METRICS_PORT: "9101"
FAIRLANE_QUEUE_METRICS_PORT: "9102"
FAIRLANE_WORKER_METRICS_PORT: "9103"
FAIRLANE_REFLECTION: {{ .Values.reflection | toString | quote }}
{{- if .Values.tls.enabled }}
FAIRLANE_ALLOW_INSECURE: "false"
FAIRLANE_TLS_CERT_FILE: "/etc/fairlane/tls/tls.crt"
FAIRLANE_TLS_KEY_FILE: "/etc/fairlane/tls/tls.key"
FAIRLANE_TLS_CA_FILE: "/etc/fairlane/tls/ca.crt"
{{- if .Values.tls.mutual }}
FAIRLANE_TLS_CLIENT_CA_FILE: "/etc/fairlane/tls/ca.crt"
{{- end }}
{{- else }}
FAIRLANE_ALLOW_INSECURE: "true"
{{- end }}
{{- with .Values.otel.endpoint }}
OTEL_EXPORTER_OTLP_ENDPOINT: {{ . | quote }}
OTEL_EXPORTER_OTLP_INSECURE: {{ $.Values.otel.insecure | toString | quote }}
{{- end }}
{{- range $key, $value := .Values.settings.extra }}
{{ $key }}: {{ $value | toString | quote }}
{{- end }}
{{- end }}

{{/* The salt of the pods' checksum of the secret values: random per release, kept in an
annotation of the chart-managed Secret and read back on upgrade. Pod annotations are
readable by whoever may get pods; an unsalted hash of the values would let them test
guessed passwords offline. Generated once per render (kept on .Values), so the Secret
and every Deployment of one render agree. */}}
{{- define "fairlane.secretSalt" -}}
{{- if not (hasKey .Values "_secretChecksumSalt") -}}
{{- $existing := include "fairlane.existingChartSecret" . | fromJson -}}
{{- $annotations := dig "metadata" "annotations" (dict) $existing -}}
{{- $salt := get $annotations "fairlane/checksum-salt" | default (randAlphaNum 32) -}}
{{- $_ := set .Values "_secretChecksumSalt" $salt -}}
{{- end -}}
{{- .Values._secretChecksumSalt -}}
{{- end }}

{{/* What the pods' checksum/secret-values annotation hashes: the chart-managed values
with the salt, or only the name of a Secret the chart does not manage. */}}
{{- define "fairlane.secretChecksum" -}}
{{- if .Values.secret.existingSecret -}}
{{- list "existingSecret" .Values.secret.existingSecret | toJson | sha256sum -}}
{{- else -}}
{{- list (include "fairlane.secretSalt" .) .Values.secret.databaseUrl .Values.secret.brokerUrl .Values.secret.serviceSecret | toJson | sha256sum -}}
{{- end -}}
{{- end }}
