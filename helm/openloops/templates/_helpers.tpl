{{/* Chart name, truncated to 63 characters. */}}
{{- define "openloops.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Fully qualified app name; leaves room for the "-migrate"/"-worker" suffixes. */}}
{{- define "openloops.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 48 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 48 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 48 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "openloops.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels of every object, without app.kubernetes.io/component. */}}
{{- define "openloops.commonLabels" -}}
helm.sh/chart: {{ include "openloops.chart" . }}
app.kubernetes.io/name: {{ include "openloops.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: openloops
{{- end }}

{{/* Labels of the control plane's objects. */}}
{{- define "openloops.labels" -}}
{{ include "openloops.commonLabels" . }}
app.kubernetes.io/component: control-plane
{{- end }}

{{/* Selector of the control-plane pods (also used by the workers' NetworkPolicy). */}}
{{- define "openloops.selectorLabels" -}}
app.kubernetes.io/name: {{ include "openloops.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: control-plane
{{- end }}

{{- define "openloops.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "openloops.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "openloops.workerServiceAccountName" -}}
{{- if .Values.workloads.serviceAccount.create }}
{{- default (printf "%s-worker" (include "openloops.fullname" .)) .Values.workloads.serviceAccount.name }}
{{- else }}
{{- .Values.workloads.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "openloops.workloadsNamespace" -}}
{{- default .Release.Namespace .Values.workloads.namespace }}
{{- end }}

{{- define "openloops.secretName" -}}
{{- default (include "openloops.fullname" .) .Values.existingSecret }}
{{- end }}

{{- define "openloops.workerSecretName" -}}
{{- if .Values.workloads.existingSecret }}
{{- .Values.workloads.existingSecret }}
{{- else if .Values.existingSecret }}
{{- fail "workloads.existingSecret is required when existingSecret is set: the chart cannot copy credentials it does not know into the worker Secret" }}
{{- else }}
{{- printf "%s-worker" (include "openloops.fullname" .) }}
{{- end }}
{{- end }}

{{- define "openloops.catalogConfigMapName" -}}
{{- default (printf "%s-catalog" (include "openloops.fullname" .)) .Values.modelCatalog.existingConfigMap }}
{{- end }}

{{- define "openloops.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{- define "openloops.trainerImage" -}}
{{- printf "%s:%s" .Values.workloads.trainerImage.repository (default .Chart.AppVersion .Values.workloads.trainerImage.tag) }}
{{- end }}

{{- define "openloops.samplerImage" -}}
{{- printf "%s:%s" .Values.workloads.samplerImage.repository (default .Chart.AppVersion .Values.workloads.samplerImage.tag) }}
{{- end }}

{{- define "openloops.publicBaseUrl" -}}
{{- if .Values.config.publicBaseUrl }}
{{- .Values.config.publicBaseUrl | trimSuffix "/" }}
{{- else if .Values.ingress.enabled }}
{{- printf "%s://%s" (ternary "https" "http" .Values.ingress.tls.enabled) .Values.ingress.host }}
{{- end }}
{{- end }}

{{/* imagePullSecrets block for the chart's own pods. */}}
{{- define "openloops.imagePullSecrets" -}}
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
{{- range . }}
  - name: {{ . | quote }}
{{- end }}
{{- end }}
{{- end }}

{{/* A secretKeyRef env var taken from the control-plane Secret. */}}
{{- define "openloops.secretEnv" -}}
- name: {{ .name }}
  valueFrom:
    secretKeyRef:
      name: {{ include "openloops.secretName" .root }}
      key: {{ .key }}
      {{- if .optional }}
      optional: true
      {{- end }}
{{- end }}

{{/* Environment shared by the control plane and the migration job (the database). */}}
{{- define "openloops.databaseEnv" -}}
{{ include "openloops.secretEnv" (dict "root" . "name" "OPENLOOPS_DATABASE_URL" "key" .Values.existingSecretKeys.databaseUrl) }}
{{- end }}
