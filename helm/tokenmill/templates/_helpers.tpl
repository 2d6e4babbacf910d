{{/* Names ------------------------------------------------------------------------------------------ */}}

{{- define "tokenmill.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "tokenmill.fullname" -}}
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

{{/* Name of one component's resources: <fullname>-<component>, kept within the 63-character DNS limit. */}}
{{- define "tokenmill.componentName" -}}
{{- $full := include "tokenmill.fullname" .root | trunc (int (sub 62 (len .component))) | trimSuffix "-" -}}
{{- printf "%s-%s" $full .component -}}
{{- end -}}

{{- define "tokenmill.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "tokenmill.labels" -}}
helm.sh/chart: {{ include "tokenmill.chart" . }}
{{ include "tokenmill.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: tokenmill
{{- end -}}

{{- define "tokenmill.selectorLabels" -}}
app.kubernetes.io/name: {{ include "tokenmill.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{/* dict "root" $ "component" "ingest" */}}
{{- define "tokenmill.componentLabels" -}}
{{ include "tokenmill.labels" .root }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "tokenmill.componentSelector" -}}
{{ include "tokenmill.selectorLabels" .root }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "tokenmill.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "tokenmill.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* <registry>/<prefix>-<image>:<tag>; dict "root" $ "image" "inference" */}}
{{- define "tokenmill.image" -}}
{{- $v := .root.Values.image -}}
{{- $name := printf "%s-%s" $v.namePrefix .image -}}
{{- $tag := default .root.Chart.AppVersion $v.tag -}}
{{- if $v.registry -}}
{{- printf "%s/%s:%s" (trimSuffix "/" $v.registry) $name $tag -}}
{{- else -}}
{{- printf "%s:%s" $name $tag -}}
{{- end -}}
{{- end -}}

{{/* Secrets and their keys --------------------------------------------------------------------------- */}}

{{- define "tokenmill.authSecretName" -}}
{{- default (include "tokenmill.componentName" (dict "root" . "component" "auth")) .Values.auth.existingSecret -}}
{{- end -}}

{{- define "tokenmill.tlsSecretName" -}}
{{- default (include "tokenmill.componentName" (dict "root" . "component" "tls")) .Values.tls.existingSecret -}}
{{- end -}}

{{- define "tokenmill.redisPasswordSecretName" -}}
{{- default (include "tokenmill.componentName" (dict "root" . "component" "redis-auth")) .Values.redis.auth.existingSecret -}}
{{- end -}}

{{/* The bundled Redis always requires a password (given, from existingSecret, or generated once by the
     secrets hook); an external Redis has one for KEDA only when the values name it. */}}
{{- define "tokenmill.redisHasPassword" -}}
{{- if or .Values.redis.internal.enabled .Values.redis.auth.password .Values.redis.auth.existingSecret -}}true{{- end -}}
{{- end -}}

{{/* Secrets the pre-install hook generates once (random, kept across upgrades): "name key" lines. */}}
{{- define "tokenmill.generatedSecrets" -}}
{{- if and (not .Values.auth.disabled) (not .Values.auth.existingSecret) (not .Values.auth.tokens) }}
{{ include "tokenmill.authSecretName" . }} {{ .Values.auth.existingSecretKey }}
{{- end }}
{{- if and .Values.redis.internal.enabled (not .Values.redis.auth.password) (not .Values.redis.auth.existingSecret) }}
{{ include "tokenmill.redisPasswordSecretName" . }} {{ .Values.redis.auth.existingSecretKey }}
{{- end }}
{{- end -}}

{{/* Autoscaling switches ----------------------------------------------------------------------------- */}}

{{/* "true" when KEDA objects render: enabled=true, or enabled=auto (the default) and the cluster serves
     keda.sh/v1alpha1 and no HPA was asked for. A bare cluster thus installs without KEDA's CRDs. */}}
{{- define "tokenmill.kedaOn" -}}
{{- $e := .Values.autoscaling.keda.enabled -}}
{{- if kindIs "bool" $e -}}
{{- if $e }}true{{ end -}}
{{- else if and (not .Values.autoscaling.hpa.enabled) (.Capabilities.APIVersions.Has "keda.sh/v1alpha1") -}}
true
{{- end -}}
{{- end -}}

{{/* Why KEDA is off (for NOTES.txt); empty when it is on. */}}
{{- define "tokenmill.kedaOffReason" -}}
{{- if not (include "tokenmill.kedaOn" .) -}}
{{- $e := .Values.autoscaling.keda.enabled -}}
{{- if kindIs "bool" $e -}}
autoscaling.keda.enabled=false
{{- else if .Values.autoscaling.hpa.enabled -}}
autoscaling.hpa.enabled=true (KEDA stays off)
{{- else -}}
KEDA's API (keda.sh/v1alpha1) is not installed in this cluster (autoscaling.keda.enabled=auto); install KEDA and run helm upgrade to turn it on
{{- end -}}
{{- end -}}
{{- end -}}

{{/* The trainer's scaling: KEDA on the train queue, when KEDA is on and the trainer's trigger is enabled. */}}
{{- define "tokenmill.trainerKedaOn" -}}
{{- if and (include "tokenmill.kedaOn" .) .Values.autoscaling.keda.trainer.enabled .Values.trainer.enabled -}}true{{- end -}}
{{- end -}}

{{- define "tokenmill.redisUrlSecretName" -}}
{{- default (include "tokenmill.componentName" (dict "root" . "component" "redis-url")) .Values.redis.external.existingSecret -}}
{{- end -}}

{{/* Redis endpoints ------------------------------------------------------------------------------------ */}}

{{- define "tokenmill.redisHost" -}}
{{- include "tokenmill.componentName" (dict "root" . "component" "redis") -}}
{{- end -}}

{{/* host:port for KEDA */}}
{{- define "tokenmill.redisAddress" -}}
{{- if .Values.redis.internal.enabled -}}
{{- printf "%s.%s.svc:6379" (include "tokenmill.redisHost" .) .Release.Namespace -}}
{{- else if .Values.redis.external.address -}}
{{- .Values.redis.external.address -}}
{{- else if .Values.redis.external.url -}}
{{- $u := urlParse .Values.redis.external.url -}}
{{- if contains ":" $u.host -}}{{ $u.host }}{{- else -}}{{ printf "%s:6379" $u.host }}{{- end -}}
{{- end -}}
{{- end -}}

{{/* Environment shared by every tokenmill container: config path, Redis URL, S3, pod identity. */}}
{{- define "tokenmill.commonEnv" -}}
- name: TOKENMILL_CONFIG
  value: /etc/tokenmill/config.yaml
# read-only root filesystem: caches (torch inductor, triton, HF) go to the /tmp emptyDir
- name: HOME
  value: /tmp
- name: XDG_CACHE_HOME
  value: /tmp/.cache
- name: POD_NAME
  valueFrom: {fieldRef: {fieldPath: metadata.name}}
# the kubernetes trainer backend makes its worker Jobs owned by this pod (cleaned up with it)
- name: POD_UID
  valueFrom: {fieldRef: {fieldPath: metadata.uid}}
- name: POD_IP
  valueFrom: {fieldRef: {fieldPath: status.podIP}}
- name: POD_NAMESPACE
  valueFrom: {fieldRef: {fieldPath: metadata.namespace}}
{{- if .Values.redis.internal.enabled }}
{{- /* kubelet expands $(REDIS_PASSWORD) in REDIS_URL because it is defined first */}}
- name: REDIS_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ include "tokenmill.redisPasswordSecretName" . }}
      key: {{ .Values.redis.auth.existingSecretKey }}
- name: REDIS_URL
  value: {{ printf "redis://:$(REDIS_PASSWORD)@%s:6379/%d" (include "tokenmill.redisHost" .) (int .Values.redis.databaseIndex) | quote }}
{{- else }}
- name: REDIS_URL
  valueFrom:
    secretKeyRef:
      name: {{ include "tokenmill.redisUrlSecretName" . }}
      key: {{ .Values.redis.external.existingSecretKey }}
{{- end }}
{{- with .Values.storage.s3 }}
{{- if .endpointUrl }}
- name: TOKENMILL_S3_ENDPOINT_URL
  value: {{ .endpointUrl | quote }}
{{- end }}
{{- if .region }}
- name: AWS_DEFAULT_REGION
  value: {{ .region | quote }}
{{- end }}
{{- if .credentialsSecret }}
- name: AWS_ACCESS_KEY_ID
  valueFrom: {secretKeyRef: {name: {{ .credentialsSecret }}, key: AWS_ACCESS_KEY_ID}}
- name: AWS_SECRET_ACCESS_KEY
  valueFrom: {secretKeyRef: {name: {{ .credentialsSecret }}, key: AWS_SECRET_ACCESS_KEY}}
{{- end }}
{{- end }}
{{- with .Values.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* Volumes every tokenmill pod mounts. */}}
{{- define "tokenmill.volumes" -}}
- name: config
  configMap:
    name: {{ include "tokenmill.componentName" (dict "root" . "component" "config") }}
- name: data
{{- if .Values.persistence.enabled }}
  persistentVolumeClaim:
    claimName: {{ default (include "tokenmill.componentName" (dict "root" . "component" "data")) .Values.persistence.existingClaim }}
{{- else }}
  emptyDir: {}
{{- end }}
- name: tmp
  emptyDir: {}
{{- if not .Values.auth.disabled }}
- name: auth
  secret:
    secretName: {{ include "tokenmill.authSecretName" . }}
    defaultMode: 0440
    items:
      - key: {{ .Values.auth.existingSecretKey }}
        path: tokens
{{- end }}
{{- if .Values.tls.enabled }}
- name: tls
  secret:
    secretName: {{ include "tokenmill.tlsSecretName" . }}
    defaultMode: 0440
{{- end }}
{{- end -}}

{{- define "tokenmill.volumeMounts" -}}
- name: config
  mountPath: /etc/tokenmill/config.yaml
  subPath: config.yaml
  readOnly: true
- name: config
  mountPath: /etc/tokenmill/probe
  readOnly: true
- name: data
  mountPath: {{ .Values.dataDir }}
- name: tmp
  mountPath: /tmp
{{- if not .Values.auth.disabled }}
- name: auth
  mountPath: /etc/tokenmill/auth
  readOnly: true
{{- end }}
{{- if .Values.tls.enabled }}
- name: tls
  mountPath: /etc/tokenmill/tls
  readOnly: true
{{- end }}
{{- end -}}

{{/* gRPC probes: native (kubelet speaks plaintext gRPC) or, with TLS, an exec probe that speaks TLS.
     dict "root" $ "port" 50051 "kind" "readiness" */}}
{{- define "tokenmill.grpcProbeAction" -}}
{{- if .root.Values.tls.enabled -}}
exec:
  command:
    - python
    - /etc/tokenmill/probe/grpc_probe.py
    - --port={{ .port }}
    - --timeout=4
    - --tls-dir=/etc/tokenmill/tls
    - --server-name={{ include "tokenmill.componentName" (dict "root" .root "component" .component) }}
{{- else -}}
grpc:
  port: {{ .port }}
{{- end -}}
{{- end -}}

{{/* The HTTP front's /health (kubelet's httpGet; HTTPS when TLS is on, where kubelet does not verify the
     certificate). With mutual TLS kubelet cannot present a client certificate: the gRPC probe is used. */}}
{{- define "tokenmill.httpProbeAction" -}}
httpGet:
  path: /health
  port: http
  scheme: {{ if .root.Values.tls.enabled }}HTTPS{{ else }}HTTP{{ end }}
{{- end -}}

{{/* readiness/liveness/startup; dict root port component startup [http: the HTTP front's port] */}}
{{- define "tokenmill.probes" -}}
{{- $live := include "tokenmill.grpcProbeAction" . -}}
{{- if and .http (not .root.Values.tls.mutual) -}}
{{- $live = include "tokenmill.httpProbeAction" . -}}
{{- end -}}
readinessProbe:
  {{- $live | nindent 2 }}
  periodSeconds: 5
  timeoutSeconds: 5
  failureThreshold: 3
livenessProbe:
  {{- $live | nindent 2 }}
  periodSeconds: 20
  timeoutSeconds: 5
  failureThreshold: 3
startupProbe:
  {{- include "tokenmill.grpcProbeAction" . | nindent 2 }}
  periodSeconds: {{ .startup.periodSeconds | default 5 }}
  timeoutSeconds: 5
  failureThreshold: {{ .startup.failureThreshold | default 24 }}
{{- end -}}

{{/* GPU scheduling: nodeSelector/tolerations merged with the component's own. dict "root" $ "c" .Values.x "gpus" n */}}
{{- define "tokenmill.scheduling" -}}
{{- $gpu := .root.Values.gpu -}}
{{- $nodeSelector := .c.nodeSelector | default dict -}}
{{- $tolerations := .c.tolerations | default list -}}
{{- if gt (int .gpus) 0 -}}
{{- $nodeSelector = merge (deepCopy $nodeSelector) $gpu.nodeSelector -}}
{{- $tolerations = concat $gpu.tolerations $tolerations -}}
{{- if $gpu.runtimeClassName }}
runtimeClassName: {{ $gpu.runtimeClassName }}
{{- end }}
{{- end }}
{{- with $nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .c.affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}

{{/* Resources with the GPU count as an extended-resource limit (GPUs go in limits; requests default to it). */}}
{{- define "tokenmill.resources" -}}
{{- $res := deepCopy (.c.resources | default dict) -}}
{{- if gt (int .gpus) 0 -}}
{{- $limits := $res.limits | default dict -}}
{{- $_ := set $limits .root.Values.gpu.resourceName (int .gpus) -}}
{{- $_ := set $res "limits" $limits -}}
{{- end -}}
{{- toYaml $res -}}
{{- end -}}

{{- define "tokenmill.podAnnotations" -}}
checksum/config: {{ include (print .root.Template.BasePath "/configmap.yaml") .root | sha256sum }}
{{- if .root.Values.metrics.podAnnotations }}
prometheus.io/scrape: "true"
prometheus.io/port: {{ add .port 1000 | quote }}
prometheus.io/path: /metrics
{{- end }}
{{- with .c.podAnnotations }}
{{ toYaml . }}
{{- end }}
{{- end -}}
