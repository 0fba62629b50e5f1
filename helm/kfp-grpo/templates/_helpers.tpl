{{/* Names ------------------------------------------------------------------ */}}

{{- define "kfp-grpo.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "kfp-grpo.fullname" -}}
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

{{- define "kfp-grpo.mlflow.fullname" -}}
{{- printf "%s-mlflow" (include "kfp-grpo.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "kfp-grpo.postgresql.fullname" -}}
{{- printf "%s-postgresql" (include "kfp-grpo.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "kfp-grpo.minio.fullname" -}}
{{- printf "%s-minio" (include "kfp-grpo.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels ----------------------------------------------------------------- */}}

{{- define "kfp-grpo.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "kfp-grpo.labels" -}}
helm.sh/chart: {{ include "kfp-grpo.chart" . }}
app.kubernetes.io/name: {{ include "kfp-grpo.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: kfp-grpo
{{- end }}

{{/* Selector labels for one component: (dict "ctx" $ "component" "mlflow") */}}
{{- define "kfp-grpo.selectorLabels" -}}
app.kubernetes.io/name: {{ include "kfp-grpo.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "kfp-grpo.componentLabels" -}}
{{ include "kfp-grpo.labels" .ctx }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{/* Images ----------------------------------------------------------------- */}}

{{- define "kfp-grpo.mlflow.image" -}}
{{- printf "%s:%s" .Values.mlflow.image.repository (default .Chart.AppVersion .Values.mlflow.image.tag) }}
{{- end }}

{{/* Endpoints -------------------------------------------------------------- */}}

{{- define "kfp-grpo.mlflow.host" -}}
{{- printf "%s.%s.svc.cluster.local" (include "kfp-grpo.mlflow.fullname" .) .Release.Namespace }}
{{- end }}

{{- define "kfp-grpo.mlflow.trackingUri" -}}
{{- printf "http://%s:%d" (include "kfp-grpo.mlflow.host" .) (int .Values.mlflow.service.port) }}
{{- end }}

{{/* Every Host header the MLflow server accepts: the in-cluster service names
     (short, namespaced, FQDN; any port), localhost for `kubectl port-forward`,
     and mlflow.allowedHosts. */}}
{{- define "kfp-grpo.mlflow.allowedHosts" -}}
{{- $svc := include "kfp-grpo.mlflow.fullname" . }}
{{- $ns := .Release.Namespace }}
{{- $hosts := list }}
{{- range $h := list $svc (printf "%s.%s" $svc $ns) (printf "%s.%s.svc" $svc $ns) (printf "%s.%s.svc.cluster.local" $svc $ns) "localhost" "127.0.0.1" }}
{{- $hosts = append $hosts $h }}
{{- $hosts = append $hosts (printf "%s:*" $h) }}
{{- end }}
{{- range .Values.mlflow.allowedHosts }}
{{- $hosts = append $hosts . }}
{{- end }}
{{- join "," $hosts }}
{{- end }}

{{- define "kfp-grpo.s3.endpoint" -}}
{{- if .Values.minio.enabled }}
{{- printf "http://%s.%s.svc.cluster.local:%d" (include "kfp-grpo.minio.fullname" .) .Release.Namespace (int .Values.minio.service.port) }}
{{- else }}
{{- .Values.externalS3.endpoint }}
{{- end }}
{{- end }}

{{- define "kfp-grpo.s3.region" -}}
{{- if .Values.minio.enabled }}us-east-1{{ else }}{{ .Values.externalS3.region }}{{ end }}
{{- end }}

{{- define "kfp-grpo.artifactsDestination" -}}
{{- $prefix := trimAll "/" .Values.artifactStore.prefix }}
{{- if $prefix }}
{{- printf "s3://%s/%s" .Values.artifactStore.bucket $prefix }}
{{- else }}
{{- printf "s3://%s" .Values.artifactStore.bucket }}
{{- end }}
{{- end }}

{{/* Secrets ---------------------------------------------------------------- */}}

{{- define "kfp-grpo.mlflow.authSecretName" -}}
{{- default (printf "%s-auth" (include "kfp-grpo.mlflow.fullname" .)) .Values.mlflow.auth.existingSecret }}
{{- end }}

{{- define "kfp-grpo.postgresql.secretName" -}}
{{- default (include "kfp-grpo.postgresql.fullname" .) .Values.postgresql.auth.existingSecret }}
{{- end }}

{{/* The Secret with the S3 keys `access-key` / `secret-key`; empty when an external
     store is used with ambient credentials (IRSA, workload identity). */}}
{{- define "kfp-grpo.s3.secretName" -}}
{{- if .Values.minio.enabled }}
{{- default (include "kfp-grpo.minio.fullname" .) .Values.minio.auth.existingSecret }}
{{- else }}
{{- .Values.externalS3.existingSecret }}
{{- end }}
{{- end }}

{{/* A base64 value for key `key` of Secret `name`: the value already in the cluster
     (so upgrades keep generated credentials), else a fresh random one.
     (dict "ctx" $ "name" "secret-name" "key" "password" "length" 32) */}}
{{- define "kfp-grpo.secretValue" -}}
{{- $existing := lookup "v1" "Secret" .ctx.Release.Namespace .name }}
{{- if and $existing $existing.data (hasKey $existing.data .key) }}
{{- index $existing.data .key }}
{{- else }}
{{- randAlphaNum (int .length) | b64enc }}
{{- end }}
{{- end }}

{{/* A base64 value copied from a Secret the user created (empty when it is not there
     yet, e.g. under `helm template`). (dict "ctx" $ "name" "secret" "key" "k") */}}
{{- define "kfp-grpo.copySecretValue" -}}
{{- $existing := lookup "v1" "Secret" .ctx.Release.Namespace .name }}
{{- if and $existing $existing.data (hasKey $existing.data .key) }}
{{- index $existing.data .key }}
{{- end }}
{{- end }}

{{/* Security --------------------------------------------------------------- */}}

{{/* Pod-level security context: (dict "uid" 10001 "gid" 0 "fsGroup" 10001) */}}
{{- define "kfp-grpo.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: {{ .uid }}
runAsGroup: {{ .gid }}
fsGroup: {{ .fsGroup }}
fsGroupChangePolicy: OnRootMismatch
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{/* Container-level security context: (dict "uid" 10001 "readOnlyRootFilesystem" true) */}}
{{- define "kfp-grpo.containerSecurityContext" -}}
runAsNonRoot: true
runAsUser: {{ .uid }}
allowPrivilegeEscalation: false
privileged: false
readOnlyRootFilesystem: {{ .readOnlyRootFilesystem }}
capabilities:
  drop:
    - ALL
seccompProfile:
  type: RuntimeDefault
{{- end }}
