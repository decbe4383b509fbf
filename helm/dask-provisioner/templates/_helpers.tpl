{{/*
Chart name, cut to 63 characters (the limit of a Kubernetes label value).
*/}}
{{- define "dask-provisioner.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/*
Full name of the release's objects: fullnameOverride, or "<release>-<chart>" unless the
release name already contains the chart name.
*/}}
{{- define "dask-provisioner.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "dask-provisioner.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "dask-provisioner.selectorLabels" -}}
app.kubernetes.io/name: {{ include "dask-provisioner.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "dask-provisioner.labels" -}}
helm.sh/chart: {{ include "dask-provisioner.chart" . }}
{{ include "dask-provisioner.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{- define "dask-provisioner.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "dask-provisioner.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "dask-provisioner.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{/*
The Secret that holds the tenants file, or "" when the service runs with its default tenant.
*/}}
{{- define "dask-provisioner.tenantsSecretName" -}}
{{- if .Values.tenants.existingSecret -}}
{{- .Values.tenants.existingSecret -}}
{{- else if .Values.tenants.items -}}
{{- printf "%s-tenants" (include "dask-provisioner.fullname" .) -}}
{{- end -}}
{{- end -}}

{{/*
The Secret that holds the PostgreSQL URL (only with state.type postgresql).
*/}}
{{- define "dask-provisioner.stateSecretName" -}}
{{- if .Values.state.postgresql.existingSecret -}}
{{- .Values.state.postgresql.existingSecret -}}
{{- else -}}
{{- printf "%s-state" (include "dask-provisioner.fullname" .) -}}
{{- end -}}
{{- end -}}

{{- define "dask-provisioner.claimName" -}}
{{- default (printf "%s-data" (include "dask-provisioner.fullname" .)) .Values.persistence.existingClaim -}}
{{- end -}}

{{/*
Stops rendering on combinations the schema cannot express or that were let through
(e.g. when values.schema.json is skipped with --skip-schema-validation).
*/}}
{{- define "dask-provisioner.validate" -}}
{{- if not (or (eq .Values.backend "local") (eq .Values.backend "mesos")) -}}
{{- fail (printf "backend must be local or mesos, not %q" .Values.backend) -}}
{{- end -}}
{{- if and (eq .Values.backend "mesos") (not .Values.mesos.master) -}}
{{- fail "mesos.master is required when backend is mesos (host:port or zk://host:2181/mesos)" -}}
{{- end -}}
{{- if eq .Values.state.type "sqlite" -}}
{{- if gt (int .Values.replicaCount) 1 -}}
{{- fail "replicaCount > 1 needs state.type postgresql: SQLite state allows one writer" -}}
{{- end -}}
{{- else if eq .Values.state.type "postgresql" -}}
{{- if not (or .Values.state.postgresql.existingSecret .Values.state.postgresql.url) -}}
{{- fail "state.type postgresql needs state.postgresql.existingSecret or state.postgresql.url" -}}
{{- end -}}
{{- if and (not .Values.persistence.enabled) (not .Values.encryptionKey.existingSecret) -}}
{{- fail "state.type postgresql with persistence disabled needs encryptionKey.existingSecret: the key encrypting credentials in the database must outlive the pod" -}}
{{- end -}}
{{- else -}}
{{- fail (printf "state.type must be sqlite or postgresql, not %q" .Values.state.type) -}}
{{- end -}}
{{- end -}}
