{{/* Served models -------------------------------------------------------------------------------------

`inference.models` lists the models served at once, each with its own Deployment (and PDB, and KEDA
ScaledObject or HPA, since the router queues each model's requests on its own stream
`tokenmill:inference:requests:<name>`); `inference.model` is the one-model shorthand. An entry's
overrides replace the `inference` value of the same key.

"tokenmill.inferenceModels" (dict "root" $ "out" $d) sets $d.models to the list, native values kept (a
JSON round trip would print large integers such as ports as floats); each item has:
  ref        the checkpoint ref served (TOKENMILL_SERVE_MODEL)
  model      the model name (the ref before ':'): the stream suffix and the router metrics' `model` label
  key        a Kubernetes-safe name derived from `model` (the tokenmill.io/model pod label)
  component  the resource-name component: "inference" for the shorthand (names and selectors as before
             the list existed, so upgrades keep the Deployment), "inference-<key>" for list entries
  selector   extra selector labels ({} for the shorthand, whose selector is immutable on upgrade)
  c          the inference values with the entry's overrides applied
  autoscaling  the entry's {minReplicas, maxReplicas} overrides ({} when none)
*/}}
{{- define "tokenmill.inferenceModels" -}}
{{- $inf := .root.Values.inference -}}
{{- $entries := $inf.models | default list -}}
{{- if and $entries $inf.model -}}
{{- fail (printf "inference.model (%q) and inference.models are both set: keep inference.models to serve several models (and set inference.model to null or an empty string), or keep inference.model for one model (and remove inference.models)" $inf.model) -}}
{{- end -}}
{{- if not (or $entries $inf.model) -}}
{{- fail "inference: set inference.model (one checkpoint ref) or inference.models (a list of {ref: ...})" -}}
{{- end -}}
{{- $list := $entries -}}
{{- if not $entries -}}{{- $list = list (dict "ref" $inf.model) -}}{{- end -}}
{{- $out := list -}}
{{- $seen := dict -}}
{{- range $e := $list -}}
{{- $model := index (splitList ":" $e.ref) 0 -}}
{{- $key := regexReplaceAll "[^a-z0-9-]+" (lower $model) "-" | trunc 40 | trimAll "-" -}}
{{- if hasKey $seen $key -}}
{{- fail (printf "inference.models: %q and %q both get the Kubernetes name %q (one Deployment and one request stream per model name): serve each model name once, or rename one model" (get $seen $key) $e.ref $key) -}}
{{- end -}}
{{- $_ := set $seen $key $e.ref -}}
{{- $c := deepCopy (omit $inf "models" "model") -}}
{{- range $k := list "replicaCount" "resources" "gpus" "nodeSelector" "tolerations" "affinity" -}}
{{- if hasKey $e $k }}{{ $_ := set $c $k (get $e $k) }}{{ end -}}
{{- end -}}
{{- $component := ternary (printf "inference-%s" $key) "inference" (gt (len $entries) 0) -}}
{{- $selector := ternary (dict "tokenmill.io/model" $key) dict (gt (len $entries) 0) -}}
{{- $out = append $out (dict "ref" $e.ref "model" $model "key" $key "component" $component "selector" $selector "c" $c "autoscaling" ($e.autoscaling | default dict)) -}}
{{- end -}}
{{- $_ := set .out "models" $out -}}
{{- end -}}
