{{/*
Named templates shared by the chart's objects: names, labels, the env list, probes, checks.
*/}}

{{/* Chart name, overridable with nameOverride. */}}
{{- define "sirocco.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Full name of every object: fullnameOverride, or release name + chart name (once). */}}
{{- define "sirocco.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/* chart-version label value. */}}
{{- define "sirocco.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels on every object. */}}
{{- define "sirocco.labels" -}}
helm.sh/chart: {{ include "sirocco.chart" . }}
{{ include "sirocco.selectorLabels" . }}
app.kubernetes.io/version: {{ .Values.image.tag | default .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/* Labels that select the pods (immutable in a Deployment: never add to them). */}}
{{- define "sirocco.selectorLabels" -}}
app.kubernetes.io/name: {{ include "sirocco.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "sirocco.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "sirocco.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* Name of the Secret the chart creates from secrets.*.value(s). */}}
{{- define "sirocco.secretName" -}}
{{- include "sirocco.fullname" . }}
{{- end }}

{{/* Whether the chart creates its Secret ("true" or empty). */}}
{{- define "sirocco.createSecret" -}}
{{- $s := .Values.secrets }}
{{- $store := $s.responsesStore }}
{{- if or (and (not $s.hfToken.existingSecret) $s.hfToken.value) (and (not $s.apiKeys.existingSecret) $s.apiKeys.values) (and (not $store.existingSecret) $store.url) }}true{{ end }}
{{- end }}

{{/*
One SIROCCO_* value as a string: lists joined with commas (Settings splits them), booleans as
true/false, whole numbers without an exponent (Helm reads every number as a float64).
*/}}
{{- define "sirocco.envValue" -}}
{{- $v := . }}
{{- if kindIs "slice" $v }}
{{- $items := list }}
{{- range $v }}{{ $items = append $items (include "sirocco.envValue" .) }}{{ end }}
{{- join "," $items }}
{{- else if and (kindIs "float64" $v) (eq $v (floor $v)) }}
{{- int64 $v }}
{{- else }}
{{- $v }}
{{- end }}
{{- end }}

{{/*
The container's environment: every non-null key of .Values.sirocco as SIROCCO_<KEY>, HF_HOME on
the model-cache volume, the token, the API keys and the response store's Redis URL by secretKeyRef only, then extraEnv.
*/}}
{{- define "sirocco.env" -}}
{{- range $key, $value := .Values.sirocco }}
{{- if not (kindIs "invalid" $value) }}
- name: {{ printf "SIROCCO_%s" (upper $key) }}
  value: {{ include "sirocco.envValue" $value | quote }}
{{- end }}
{{- end }}
- name: HF_HOME
  value: /data/huggingface
{{- $hf := .Values.secrets.hfToken }}
{{- if or $hf.existingSecret $hf.value }}
- name: HF_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ $hf.existingSecret | default (include "sirocco.secretName" .) }}
      key: {{ ternary $hf.existingSecretKey "HF_TOKEN" (ne $hf.existingSecret "") }}
{{- end }}
{{- $keys := .Values.secrets.apiKeys }}
{{- if or $keys.existingSecret $keys.values }}
- name: SIROCCO_API_KEYS
  valueFrom:
    secretKeyRef:
      name: {{ $keys.existingSecret | default (include "sirocco.secretName" .) }}
      key: {{ ternary $keys.existingSecretKey "SIROCCO_API_KEYS" (ne $keys.existingSecret "") }}
{{- end }}
{{- $store := .Values.secrets.responsesStore }}
{{- if or $store.existingSecret $store.url }}
- name: SIROCCO_RESPONSES_STORE
  valueFrom:
    secretKeyRef:
      name: {{ $store.existingSecret | default (include "sirocco.secretName" .) }}
      key: {{ ternary $store.existingSecretKey "SIROCCO_RESPONSES_STORE" (ne $store.existingSecret "") }}
{{- end }}
{{- with .Values.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* An HTTP GET probe on /health; pass (dict "probe" .Values.probes.<kind>). */}}
{{- define "sirocco.probe" -}}
httpGet:
  path: /health
  port: http
{{- range $field, $value := .probe }}
{{ $field }}: {{ $value }}
{{- end }}
{{- end }}

{{/* Grace period: drain timeout (rounded up) + preStop sleep + margin, so the drain is never cut short. */}}
{{- define "sirocco.terminationGracePeriodSeconds" -}}
{{- $drain := ceil .Values.sirocco.drain_timeout_s | int }}
{{- add $drain .Values.lifecycle.preStopSleepSeconds .Values.lifecycle.terminationGraceMarginSeconds }}
{{- end }}

{{/* Combinations the schema cannot reject; fails the render with a message. */}}
{{- define "sirocco.validate" -}}
{{- if and .Values.autoscaling.enabled .Values.keda.enabled }}
{{- fail "autoscaling.enabled and keda.enabled are both true: KEDA creates its own HorizontalPodAutoscaler, so turn one of them off" }}
{{- end }}
{{- if and (eq .Values.modelCache.type "existingClaim") (not .Values.modelCache.existingClaim) }}
{{- fail "modelCache.type is existingClaim but modelCache.existingClaim (the claim's name) is empty" }}
{{- end }}
{{- if and .Values.autoscaling.enabled (gt (int .Values.autoscaling.minReplicas) (int .Values.autoscaling.maxReplicas)) }}
{{- fail "autoscaling.minReplicas is greater than autoscaling.maxReplicas" }}
{{- end }}
{{- if and .Values.keda.enabled (gt (int .Values.keda.minReplicaCount) (int .Values.keda.maxReplicaCount)) }}
{{- fail "keda.minReplicaCount is greater than keda.maxReplicaCount" }}
{{- end }}
{{- end }}

{{/* PromQL label matchers for this release's series (labels a ServiceMonitor scrape adds). */}}
{{- define "sirocco.promSelector" -}}
namespace="{{ .Release.Namespace }}", service="{{ include "sirocco.fullname" . }}"
{{- end }}

{{/*
GPUs per pod: .Values.gpus, or one per tensor-parallel rank when it is null; fails when the ranks outnumber the GPUs.
*/}}
{{- define "sirocco.gpus" -}}
{{- $ranks := int (.Values.sirocco.tensor_parallel_size | default 1) -}}
{{- $gpus := ternary $ranks (int .Values.gpus) (kindIs "invalid" .Values.gpus) -}}
{{- if and (gt $gpus 0) (gt $ranks $gpus) -}}
{{- fail (printf "sirocco.tensor_parallel_size (%d) exceeds the GPUs requested (gpus: %d): one GPU per rank" $ranks $gpus) -}}
{{- end -}}
{{- $gpus -}}
{{- end }}
