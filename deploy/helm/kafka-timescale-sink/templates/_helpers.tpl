{{/* Names and labels. */}}
{{- define "kts.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "kts.selectorLabels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "kts.labels" -}}
{{ include "kts.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "kts.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end -}}

{{/* The Secret with the runtime role's password, and its key. */}}
{{- define "kts.writerSecret" -}}
{{- .Values.database.credentials.existingSecret | default (printf "%s-writer" (include "kts.fullname" .)) -}}
{{- end -}}
{{- define "kts.writerSecretKey" -}}
{{- if .Values.database.credentials.existingSecret -}}{{ .Values.database.credentials.writerPasswordKey }}{{- else -}}password{{- end -}}
{{- end -}}
{{- define "kts.ownerSecret" -}}
{{- .Values.database.credentials.existingSecret | default (printf "%s-owner" (include "kts.fullname" .)) -}}
{{- end -}}
{{- define "kts.ownerSecretKey" -}}
{{- if .Values.database.credentials.existingSecret -}}{{ .Values.database.credentials.ownerPasswordKey }}{{- else -}}password{{- end -}}
{{- end -}}

{{/* Refusals: a values file that cannot work fails at render time, not in the pods. */}}
{{- define "kts.validate" -}}
{{- $partitions := int .Values.kafka.inputPartitions -}}
{{- if lt $partitions 1 -}}{{- fail "kafka.inputPartitions must be at least 1" -}}{{- end -}}
{{- if and (not .Values.autoscaling.enabled) (gt (int .Values.replicaCount) $partitions) -}}
{{- fail (printf "replicaCount %d exceeds kafka.inputPartitions %d: replicas beyond the partition count sit idle" (int .Values.replicaCount) $partitions) -}}
{{- end -}}
{{- if and .Values.autoscaling.enabled (gt (int .Values.autoscaling.maxReplicas) $partitions) -}}
{{- fail (printf "autoscaling.maxReplicas %d exceeds kafka.inputPartitions %d: replicas beyond the partition count sit idle" (int .Values.autoscaling.maxReplicas) $partitions) -}}
{{- end -}}
{{- if and .Values.autoscaling.enabled (gt (int .Values.autoscaling.minReplicas) (int .Values.autoscaling.maxReplicas)) -}}
{{- fail "autoscaling.minReplicas exceeds autoscaling.maxReplicas" -}}
{{- end -}}
{{- $c := .Values.database.credentials -}}
{{- if and (not $c.existingSecret) (not $c.writerPassword) -}}
{{- fail "database.credentials: set existingSecret, or writerPassword (and ownerPassword for the migration)" -}}
{{- end -}}
{{- if and (not $c.existingSecret) .Values.migration.enabled (not $c.ownerPassword) -}}
{{- fail "database.credentials.ownerPassword is needed by the migration Job (or set existingSecret)" -}}
{{- end -}}
{{- if and .Values.kafka.sasl.mechanism (not .Values.kafka.sasl.existingSecret) -}}
{{- fail "kafka.sasl.existingSecret: the Secret holding the SASL password" -}}
{{- end -}}
{{- end -}}

{{/* The settings both the Deployment (through the ConfigMap) and the migration Job use: one
     definition, so the two cannot drift.  Passwords and identity are added where used. */}}
{{- define "kts.settings" -}}
KAFKA_BOOTSTRAP_SERVERS: {{ .Values.kafka.bootstrapServers | quote }}
KAFKA_INPUT_TOPIC: {{ .Values.kafka.inputTopic | quote }}
KAFKA_GROUP_ID: {{ .Values.kafka.groupId | quote }}
{{- with .Values.kafka.securityProtocol }}
KAFKA_SECURITY_PROTOCOL: {{ . | quote }}
{{- end }}
{{- with .Values.kafka.sasl.mechanism }}
KAFKA_SASL_MECHANISM: {{ . | quote }}
KAFKA_SASL_USERNAME: {{ $.Values.kafka.sasl.username | quote }}
{{- end }}
{{- if .Values.kafka.tls.caSecret }}
KAFKA_SSL_CA_LOCATION: {{ printf "/etc/kafka-timescale-sink/kafka-tls/%s" .Values.kafka.tls.caKey | quote }}
{{- end }}
TIMESCALE_HOST: {{ .Values.database.host | quote }}
TIMESCALE_PORT: {{ .Values.database.port | toString | quote }}
TIMESCALE_DB: {{ .Values.database.name | quote }}
TIMESCALE_SSLMODE: {{ .Values.database.sslmode | quote }}
{{- if .Values.database.tls.secretName }}
TIMESCALE_SSLROOTCERT: {{ printf "/etc/kafka-timescale-sink/pg-tls/%s" .Values.database.tls.caKey | quote }}
{{- if .Values.database.tls.clientCertificate }}
TIMESCALE_SSLCERT: "/etc/kafka-timescale-sink/pg-tls/tls.crt"
TIMESCALE_SSLKEY: "/etc/kafka-timescale-sink/pg-tls/tls.key"
{{- end }}
{{- end }}
METRICS_PORT: {{ .Values.metrics.port | toString | quote }}
SHUTDOWN_TIMEOUT: {{ .Values.shutdownTimeout | toString | quote }}
{{- range $name, $value := .Values.config }}
{{ $name }}: {{ $value | toString | quote }}
{{- end }}
{{- end -}}

{{/* Volumes and mounts for the TLS material, shared by the Deployment and the Job. */}}
{{- define "kts.volumes" -}}
- name: tmp
  emptyDir: {sizeLimit: 16Mi}
{{- if .Values.database.tls.secretName }}
- name: pg-tls
  secret:
    secretName: {{ .Values.database.tls.secretName }}
    # Owned by root, readable by the pod's group (fsGroup): the only shape of a key file libpq
    # accepts from a user that does not own it.
    defaultMode: 0440
{{- end }}
{{- if .Values.kafka.tls.caSecret }}
- name: kafka-tls
  secret:
    secretName: {{ .Values.kafka.tls.caSecret }}
{{- end }}
{{- end -}}

{{- define "kts.volumeMounts" -}}
- name: tmp
  mountPath: /tmp
{{- if .Values.database.tls.secretName }}
- name: pg-tls
  mountPath: /etc/kafka-timescale-sink/pg-tls
  readOnly: true
{{- end }}
{{- if .Values.kafka.tls.caSecret }}
- name: kafka-tls
  mountPath: /etc/kafka-timescale-sink/kafka-tls
  readOnly: true
{{- end }}
{{- end -}}

{{/* Secret-sourced variables every container of the chart needs besides the database password. */}}
{{- define "kts.kafkaSecretEnv" -}}
{{- if .Values.kafka.sasl.mechanism }}
- name: KAFKA_SASL_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ .Values.kafka.sasl.existingSecret }}
      key: {{ .Values.kafka.sasl.passwordKey }}
{{- end }}
{{- end -}}
