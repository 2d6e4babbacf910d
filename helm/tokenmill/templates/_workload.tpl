{{/*
One tokenmill service as a Deployment. Arguments (dict):
  root       the top-level context ($)
  component  resource/component name (ingest, trainer, checkpoint, compress, inference, router)
  c          that component's values
  image      image suffix (router uses the inference image)
  module     python module to run (python -m <module> --config /etc/tokenmill/config.yaml)
  configKey  its entry under config `services` (the router serves the inference API)
  gpus       GPUs per pod
  replicas   replica count, or nil when an autoscaler owns it
  args       extra command-line arguments after --config (optional)
  serviceAccount  a ServiceAccount of its own, with its API token mounted (optional; default: the
                  shared one, without a token)
  resourceName  the component part of the Deployment's name (optional; default: component), e.g.
                inference-<model> for one of several inference Deployments
  podLabels  extra pod (and Deployment) labels (optional)
  selector   extra selector labels, a subset of podLabels (optional): keeps several Deployments of one
             component from selecting each other's pods
The component's `httpPort` (router) adds the named `http` port; its readiness/liveness then ask /health.
*/}}
{{- define "tokenmill.deployment" -}}
{{- $root := .root -}}
{{- $c := .c -}}
{{- $sel := dict "root" $root "component" .component -}}
apiVersion: apps/v1
kind: Deployment
metadata:
  name: {{ include "tokenmill.componentName" (dict "root" $root "component" (.resourceName | default .component)) }}
  labels:
    {{- include "tokenmill.componentLabels" $sel | nindent 4 }}
    {{- with .podLabels }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
spec:
  {{- if hasKey . "replicas" }}
  replicas: {{ .replicas }}
  {{- end }}
  revisionHistoryLimit: 5
  {{- with .strategy }}
  strategy:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  selector:
    matchLabels:
      {{- include "tokenmill.componentSelector" $sel | nindent 6 }}
      {{- with .selector }}
      {{- toYaml . | nindent 6 }}
      {{- end }}
  template:
    metadata:
      labels:
        {{- include "tokenmill.componentLabels" $sel | nindent 8 }}
        {{- with .podLabels }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      annotations:
        {{- include "tokenmill.podAnnotations" (dict "root" $root "port" $c.port "c" $c) | nindent 8 }}
    spec:
      {{- if .serviceAccount }}
      serviceAccountName: {{ .serviceAccount }}
      automountServiceAccountToken: true
      {{- else }}
      serviceAccountName: {{ include "tokenmill.serviceAccountName" $root }}
      {{- end }}
      {{- with $root.Values.imagePullSecrets }}
      imagePullSecrets:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      securityContext:
        {{- toYaml $root.Values.podSecurityContext | nindent 8 }}
      terminationGracePeriodSeconds: {{ $c.terminationGracePeriodSeconds | default (add (int $root.Values.config.shutdown_grace_seconds) 10) }}
      {{- include "tokenmill.scheduling" (dict "root" $root "c" $c "gpus" .gpus) | nindent 6 }}
      containers:
        - name: {{ .component }}
          image: {{ include "tokenmill.image" (dict "root" $root "image" .image) }}
          imagePullPolicy: {{ $root.Values.image.pullPolicy }}
          command: {{ concat (list "python" "-m" .module "--config" "/etc/tokenmill/config.yaml") (.args | default list) | toJson }}
          env:
            {{- include "tokenmill.commonEnv" $root | nindent 12 }}
            # bind all interfaces in this pod; other pods dial the Service name from config.yaml
            - name: TOKENMILL_SERVICES__{{ upper .configKey }}__HOST
              value: "0.0.0.0"
            # the routable address it publishes (replica heartbeats): the pod IP, never the 0.0.0.0 it binds
            - name: TOKENMILL_SERVICES__{{ upper .configKey }}__ADVERTISE_HOST
              value: $(POD_IP)
            - name: TOKENMILL_SERVICES__{{ upper .configKey }}__WORKERS
              value: {{ $c.workers | quote }}
            {{- if and (eq .component "trainer") $root.Values.ray.enabled }}
            - name: RAY_ADDRESS
              value: {{ printf "ray://%s-head-svc:10001" (include "tokenmill.componentName" (dict "root" $root "component" "ray")) | quote }}
            {{- end }}
            {{- with $c.extraEnv }}
            {{- toYaml . | nindent 12 }}
            {{- end }}
          ports:
            - name: grpc
              containerPort: {{ $c.port }}
              protocol: TCP
            - name: metrics
              containerPort: {{ add $c.port 1000 }}
              protocol: TCP
            {{- if $c.httpPort }}
            - name: http
              containerPort: {{ $c.httpPort }}
              protocol: TCP
            {{- end }}
          {{- include "tokenmill.probes" (dict "root" $root "port" $c.port "component" .component "startup" ($c.startupProbe | default dict) "http" $c.httpPort) | nindent 10 }}
          resources:
            {{- include "tokenmill.resources" (dict "root" $root "c" $c "gpus" .gpus) | nindent 12 }}
          securityContext:
            {{- toYaml $root.Values.containerSecurityContext | nindent 12 }}
          volumeMounts:
            {{- include "tokenmill.volumeMounts" $root | nindent 12 }}
            {{- if $c.shmSize }}
            - name: dshm
              mountPath: /dev/shm
            {{- end }}

      volumes:
        {{- include "tokenmill.volumes" $root | nindent 8 }}
        {{- if $c.shmSize }}
        - name: dshm
          emptyDir:
            medium: Memory
            sizeLimit: {{ $c.shmSize }}
        {{- end }}
{{- end -}}

{{/* ClusterIP Service exposing gRPC and metrics of one component. dict root component c [type annotations headless] */}}
{{- define "tokenmill.service" -}}
{{- $sel := dict "root" .root "component" .component -}}
apiVersion: v1
kind: Service
metadata:
  name: {{ include "tokenmill.componentName" $sel }}{{ if .headless }}-headless{{ end }}
  labels:
    {{- include "tokenmill.componentLabels" $sel | nindent 4 }}
    {{- if .headless }}
    tokenmill.io/headless: "true"
    {{- end }}
  {{- with .annotations }}
  annotations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
spec:
  {{- if .headless }}
  clusterIP: None
  {{- else }}
  type: {{ .type | default "ClusterIP" }}
  {{- end }}
  selector:
    {{- include "tokenmill.componentSelector" $sel | nindent 4 }}
  ports:
    - name: grpc
      port: {{ .c.port }}
      targetPort: grpc
      protocol: TCP
      appProtocol: grpc
    - name: metrics
      port: {{ add .c.port 1000 }}
      targetPort: metrics
      protocol: TCP
      appProtocol: http
    {{- if .c.httpPort }}
    - name: http
      port: {{ .c.httpPort }}
      targetPort: http
      protocol: TCP
      appProtocol: {{ if .root.Values.tls.enabled }}https{{ else }}http{{ end }}
    {{- end }}
{{- end -}}

{{/* PodDisruptionBudget for a component (policy/v1). dict root component c [resourceName selector], the
     last two as for tokenmill.deployment (one PDB per Deployment). */}}
{{- define "tokenmill.pdb" -}}
{{- $sel := dict "root" .root "component" .component -}}
{{- if and .c.pdb .c.pdb.enabled }}
---
apiVersion: policy/v1
kind: PodDisruptionBudget
metadata:
  name: {{ include "tokenmill.componentName" (dict "root" .root "component" (.resourceName | default .component)) }}
  labels:
    {{- include "tokenmill.componentLabels" $sel | nindent 4 }}
spec:
  {{- if hasKey .c.pdb "minAvailable" }}
  minAvailable: {{ .c.pdb.minAvailable }}
  {{- else }}
  maxUnavailable: {{ .c.pdb.maxUnavailable | default 1 }}
  {{- end }}
  unhealthyPodEvictionPolicy: AlwaysAllow
  selector:
    matchLabels:
      {{- include "tokenmill.componentSelector" $sel | nindent 6 }}
      {{- with .selector }}
      {{- toYaml . | nindent 6 }}
      {{- end }}
{{- end }}
{{- end -}}
