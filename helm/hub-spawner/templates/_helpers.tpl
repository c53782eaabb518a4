{{/*
Names. The fullname is cut to 42 characters so that "<fullname>-proxy-public" stays a valid
Service name (63).
*/}}
{{- define "hub-spawner.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 42 | trimSuffix "-" }}
{{- end }}

{{- define "hub-spawner.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 42 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 42 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 42 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "hub-spawner.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Labels, z2jh style (component, app, release) plus app.kubernetes.io/*.
Call with (dict "root" $ "component" "hub").
*/}}
{{- define "hub-spawner.selectorLabels" -}}
app.kubernetes.io/name: {{ include "hub-spawner.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
component: {{ .component }}
{{- end }}

{{/*
Pod template labels: without chart and app version, so that a chart upgrade alone restarts no
pod (a restart of the proxy or the tunnel service drops every open connection).
*/}}
{{- define "hub-spawner.podLabels" -}}
{{ include "hub-spawner.selectorLabels" . }}
app.kubernetes.io/component: {{ .component }}
app: {{ include "hub-spawner.name" .root }}
release: {{ .root.Release.Name }}
{{- end }}

{{- define "hub-spawner.labels" -}}
{{ include "hub-spawner.selectorLabels" . }}
app.kubernetes.io/component: {{ .component }}
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
helm.sh/chart: {{ include "hub-spawner.chart" .root }}
app: {{ include "hub-spawner.name" .root }}
release: {{ .root.Release.Name }}
{{- end }}

{{- define "hub-spawner.hubName" -}}{{ include "hub-spawner.fullname" . }}-hub{{- end }}
{{- define "hub-spawner.proxyName" -}}{{ include "hub-spawner.fullname" . }}-proxy{{- end }}
{{- define "hub-spawner.tunnelsName" -}}{{ include "hub-spawner.fullname" . }}-tunnels{{- end }}
{{- define "hub-spawner.secretName" -}}{{ include "hub-spawner.fullname" . }}-secret{{- end }}
{{- define "hub-spawner.hubValuesName" -}}{{ include "hub-spawner.fullname" . }}-hub-values{{- end }}
{{- define "hub-spawner.knownHostsName" -}}
{{ include "hub-spawner.fullname" . }}-known-hosts
{{- end }}
{{- define "hub-spawner.keysSecretName" -}}
{{ .Values.identity.keysSecret | default (printf "%s-ssh-keys" (include "hub-spawner.fullname" .)) }}
{{- end }}

{{- define "hub-spawner.hubImage" -}}
{{ .Values.hub.image.name }}:{{ .Values.hub.image.tag }}
{{- end }}

{{/* The hub's base URL with one leading and one trailing slash. */}}
{{- define "hub-spawner.baseUrl" -}}
{{- $trimmed := trimAll "/" .Values.hub.baseUrl }}
{{- if $trimmed }}/{{ $trimmed }}/{{ else }}/{{ end }}
{{- end }}

{{/*
The Secret's values as JSON: for each key, the value the user gave in values, else the one the
Secret already holds (lookup: kept across `helm upgrade`), else a new random one. A user value
wins over the stored one, so a secret can be rotated by setting it. `helm template` and
--dry-run=client cannot look up, so they show new random values.

Computed once per render and cached, so that the Secret and the pods' checksum annotations agree.
*/}}
{{- define "hub-spawner.secretValues" -}}
{{- if not (hasKey .Release "hubSpawnerSecretCache") }}
{{- $existing := dict }}
{{- $secret := lookup "v1" "Secret" .Release.Namespace (include "hub-spawner.secretName" .) }}
{{- if $secret }}
{{- $existing = $secret.data | default dict }}
{{- end }}
{{- $values := dict }}
{{- range $key, $given := dict "hub.cookie-secret" .Values.hub.cookieSecret "hub.crypt-key" .Values.hub.cryptKey "proxy.auth-token" .Values.proxy.secretToken "tunnels.token" .Values.tunnels.token }}
{{- if $given }}
{{- $_ := set $values $key $given }}
{{- else if hasKey $existing $key }}
{{- $_ := set $values $key (index $existing $key | b64dec) }}
{{- else }}
{{- /* 64 hex characters: 32 random bytes */}}
{{- $_ := set $values $key (randAlphaNum 64 | sha256sum) }}
{{- end }}
{{- end }}
{{- $_ := set .Release "hubSpawnerSecretCache" $values }}
{{- end }}
{{- toJson (get .Release "hubSpawnerSecretCache") }}
{{- end }}

{{/*
The identity mode (identity.mode): keys, certificate or authState. Which pod holds what:
  keys:        the keys Secret, copied into memory, in the hub and tunnels pods (+ keys-sync);
  certificate: the CA key Secret, copied into memory, in the hub pod only: the hub mints each
               connection's key and certificate and hands the tunnel service its own over the
               control API, so the tunnels pod holds no key material;
  authState:   nothing: the key comes from the user's auth_state (JUPYTERHUB_CRYPT_KEY).
*/}}
{{- define "hub-spawner.identityMode" -}}
{{ .Values.identity.mode | default "keys" }}
{{- end }}

{{/* "true" when hub.extraEnv sets the variable .name (call with (dict "root" $ "name" NAME)), else "". */}}
{{- define "hub-spawner.extraEnvSets" -}}
{{- $found := false }}
{{- range .root.Values.hub.extraEnv }}
{{- if eq .name $.name }}{{ $found = true }}{{ end }}
{{- end }}
{{- if $found }}true{{ end }}
{{- end }}

{{/* Where the hub reads the CA key in certificate mode (ssh_ca_key_path). */}}
{{- define "hub-spawner.caKeyPath" -}}/etc/hub_spawner/ca/ca{{- end }}

{{/*
Copies the files of a Secret volume (staging, read-only) into a directory of the in-memory
emptyDir the containers read: mode 0600, in a 0700 directory, owned by the pod's uid (1000). A
file removed from the Secret is removed here too. Call with (dict "src" staging "dst" dir). Used
by the initContainers (once) and the keys-sync sidecar (every identity.resyncSeconds).
*/}}
{{- define "hub-spawner.keysCopyScript" -}}
set -eu
umask 077
src={{ .src }}
dst={{ .dst }}
mkdir -p "$dst"
chmod 0700 "$dst"
for key in "$src"/*; do
  [ -f "$key" ] || continue
  name=$(basename "$key")
  if ! cmp -s "$key" "$dst/$name"; then
    cp "$key" "$dst/.$name.tmp"
    chmod 0600 "$dst/.$name.tmp"
    mv -f "$dst/.$name.tmp" "$dst/$name"
  fi
done
for key in "$dst"/*; do
  [ -e "$key" ] || continue
  [ -e "$src/$(basename "$key")" ] || rm -f "$key"
done
{{- end }}

{{/*
The keys and known_hosts plumbing shared by the hub and tunnels pods.
*/}}
{{- define "hub-spawner.securityContext" -}}
runAsNonRoot: true
runAsUser: 1000
runAsGroup: 1000
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
capabilities:
  drop: [ALL]
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{- define "hub-spawner.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: 1000
runAsGroup: 1000
fsGroup: 1000
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{/*
Why the copy: OpenSSH (the tunnel service runs `ssh -i /etc/hub_spawner/keys/<user>`) refuses a
private key that its group or others can read, and so does the spawner for the CA key
(ssh_ca_key_path); and a Secret volume in a pod with fsGroup is always group-readable (fsGroup
adds g+r to defaultMode). So the Secret (defaultMode 0400) is mounted only at a staging path, in
the copying containers (uid 1000 reads it through that very group bit: the pods' fsGroup is
1000), and copied into a Memory emptyDir.
The emptyDir's own root is created by the kubelet (root, 0777), so the files live in its
subdirectory (keys: "keys", the CA: "ca"), which the copy creates 0700 and owned by uid 1000, and
which the main container mounts (subPath) read-only at /etc/hub_spawner/keys (/etc/hub_spawner/ca).

Call with (dict "root" $ "name" initContainer "volume" emptyDir volume): the Secret volume is
"<volume>-staging" at /etc/hub_spawner/<volume>-staging, the emptyDir at /<volume>-rw.
*/}}
{{- define "hub-spawner.copyInitContainer" -}}
- name: {{ .name }}
  image: {{ include "hub-spawner.hubImage" .root }}
  imagePullPolicy: {{ .root.Values.hub.image.pullPolicy }}
  command: [sh, -c]
  args:
    - |
      {{- include "hub-spawner.keysCopyScript" (dict "src" (printf "/etc/hub_spawner/%s-staging" .volume) "dst" (printf "/%s-rw/%s" .volume .volume)) | nindent 6 }}
  securityContext:
    {{- include "hub-spawner.securityContext" .root | nindent 4 }}
  volumeMounts:
    - name: {{ .volume }}-staging
      mountPath: /etc/hub_spawner/{{ .volume }}-staging
      readOnly: true
    - name: {{ .volume }}
      mountPath: /{{ .volume }}-rw
{{- end }}

{{/*
The initContainers of a pod for the identity mode: keys-init (mode keys, hub and tunnels),
ca-init (mode certificate, hub only), or none. Call with (dict "root" $ "component" "hub").
Renders the whole "initContainers:" key, or nothing.
*/}}
{{- define "hub-spawner.identityInitContainers" -}}
{{- $mode := include "hub-spawner.identityMode" .root }}
{{- if eq $mode "keys" }}
initContainers:
  {{- include "hub-spawner.copyInitContainer" (dict "root" .root "name" "keys-init" "volume" "keys") | nindent 2 }}
{{- else if and (eq $mode "certificate") (eq .component "hub") }}
initContainers:
  {{- include "hub-spawner.copyInitContainer" (dict "root" .root "name" "ca-init" "volume" "ca") | nindent 2 }}
{{- end }}
{{- end }}

{{/* The keys-sync sidecar: mode keys with identity.resyncSeconds > 0 only. */}}
{{- define "hub-spawner.keysSyncContainer" -}}
{{- if and (eq (include "hub-spawner.identityMode" .) "keys") (gt (int .Values.identity.resyncSeconds) 0) -}}
- name: keys-sync
  image: {{ include "hub-spawner.hubImage" . }}
  imagePullPolicy: {{ .Values.hub.image.pullPolicy }}
  command: [sh, -c]
  args:
    - |
      copy() {
        {{- include "hub-spawner.keysCopyScript" (dict "src" "/etc/hub_spawner/keys-staging" "dst" "/keys-rw/keys") | nindent 8 }}
      }
      trap 'exit 0' TERM INT
      while :; do
        (copy) || echo "keys-sync: copy failed" >&2
        sleep {{ int .Values.identity.resyncSeconds }} & wait $!
      done
  securityContext:
    {{- include "hub-spawner.securityContext" . | nindent 4 }}
  resources:
    requests:
      cpu: 5m
      memory: 8Mi
    limits:
      memory: 32Mi
  volumeMounts:
    - name: keys-staging
      mountPath: /etc/hub_spawner/keys-staging
      readOnly: true
    - name: keys
      mountPath: /keys-rw
{{- end }}
{{- end }}

{{/*
The identity volumes of a pod (and known_hosts, /tmp): call with (dict "root" $ "component"
"hub"). Mode keys: the keys Secret and its emptyDir (hub and tunnels); mode certificate: the CA
Secret (only its key identity.caKeySecret.key, as file "ca") and its emptyDir (hub only).
*/}}
{{- define "hub-spawner.identityVolumes" -}}
{{- $mode := include "hub-spawner.identityMode" .root }}
{{- if eq $mode "keys" }}
- name: keys-staging
  secret:
    secretName: {{ include "hub-spawner.keysSecretName" .root }}
    defaultMode: 0400
- name: keys
  emptyDir:
    medium: Memory
    sizeLimit: 16Mi
{{- else if and (eq $mode "certificate") (eq .component "hub") }}
- name: ca-staging
  secret:
    secretName: {{ .root.Values.identity.caKeySecret.name }}
    defaultMode: 0400
    items:
      - key: {{ .root.Values.identity.caKeySecret.key | default "ca" }}
        path: ca
- name: ca
  emptyDir:
    medium: Memory
    sizeLimit: 1Mi
{{- end }}
- name: known-hosts
  configMap:
    name: {{ include "hub-spawner.knownHostsName" .root }}
- name: tmp
  emptyDir: {}
{{- end }}

{{- define "hub-spawner.identityVolumeMounts" -}}
{{- $mode := include "hub-spawner.identityMode" .root }}
{{- if eq $mode "keys" }}
- name: keys
  mountPath: /etc/hub_spawner/keys
  subPath: keys
  readOnly: true
{{- else if and (eq $mode "certificate") (eq .component "hub") }}
- name: ca
  mountPath: {{ include "hub-spawner.caKeyPath" .root | dir }}
  subPath: ca
  readOnly: true
{{- end }}
- name: known-hosts
  mountPath: /etc/hub_spawner/known_hosts
  subPath: known_hosts
  readOnly: true
- name: tmp
  mountPath: /tmp
{{- end }}

{{- define "hub-spawner.scheduling" -}}
{{- with .nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{- define "hub-spawner.imagePullSecrets" -}}
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{/*
The values files/jupyterhub_config.py reads (values.json in the Secret <fullname>-hub-values).
*/}}
{{- define "hub-spawner.hubValuesJson" -}}
{{- $cluster := omit .Values.cluster "knownHosts" }}
{{- $hub := dict "baseUrl" (include "hub-spawner.baseUrl" .) "config" .Values.hub.config "extraConfig" .Values.hub.extraConfig "internalSsl" (dict "enabled" .Values.hub.internalSsl.enabled) }}
{{- $identity := dict "mode" (include "hub-spawner.identityMode" .) }}
{{- if eq $identity.mode "certificate" }}
{{- $_ := set $identity "certificateMinutes" .Values.identity.certificateMinutes }}
{{- else if eq $identity.mode "authState" }}
{{- $_ := set $identity "authState" .Values.identity.authState }}
{{- end }}
{{- toPrettyJson (dict "cluster" $cluster "identity" $identity "spawner" .Values.spawner "hub" $hub "cull" .Values.cull) }}
{{- end }}

{{/*
The internal_ssl certificates (hub.internalSsl), as a JSON dict of file name -> PEM: the five
authorities JupyterHub's internal_ssl uses (<name>.key, <name>.crt; the hub signs its own and
each server's certificate with them, external_ssl_authorities), the proxy's API and client
certificates, and the proxy's two trust bundles as JupyterHub lays trust out
(init_internal_ssl). Generated once and kept: an existing Secret <fullname>-internal-ssl is
reused as it is, so an upgrade changes no certificate (delete the Secret to renew them all,
then restart the pods). Computed once per render.
*/}}
{{- define "hub-spawner.internalSslFiles" -}}
{{- if not (hasKey .Release "hubSpawnerInternalSslCache") }}
{{- $fullname := include "hub-spawner.fullname" . }}
{{- $files := dict }}
{{- $secret := lookup "v1" "Secret" .Release.Namespace (printf "%s-internal-ssl" $fullname) }}
{{- if and $secret $secret.data (hasKey $secret.data "proxy-client-ca_trust.crt") }}
{{- range $key, $value := $secret.data }}
{{- $_ := set $files $key ($value | b64dec) }}
{{- end }}
{{- else }}
{{- $days := int .Values.hub.internalSsl.certificateDays }}
{{- $cas := dict }}
{{- range $name := list "hub-ca" "notebooks-ca" "proxy-api-ca" "proxy-client-ca" "services-ca" }}
{{- $ca := genCA (printf "%s %s" $fullname $name) $days }}
{{- $_ := set $cas $name $ca }}
{{- $_ := set $files (printf "%s.key" $name) $ca.Key }}
{{- $_ := set $files (printf "%s.crt" $name) $ca.Cert }}
{{- end }}
{{- $api := genSignedCert "proxy-api" (list "127.0.0.1") (list "localhost" (printf "%s-proxy-api" $fullname) (printf "%s-proxy-api.%s.svc" $fullname .Release.Namespace)) $days (get $cas "proxy-api-ca") }}
{{- $_ := set $files "proxy-api.key" $api.Key }}
{{- $_ := set $files "proxy-api.crt" $api.Cert }}
{{- $client := genSignedCert "proxy-client" (list "127.0.0.1") (list "localhost") $days (get $cas "proxy-client-ca") }}
{{- $_ := set $files "proxy-client.key" $client.Key }}
{{- $_ := set $files "proxy-client.crt" $client.Cert }}
{{- /* What the proxy trusts: its API's clients (the hub, services, servers) and the servers and hub it proxies to. */}}
{{- $_ := set $files "proxy-api-ca_trust.crt" (printf "%s\n%s\n%s\n%s" (get $files "proxy-api-ca.crt") (get $files "hub-ca.crt") (get $files "services-ca.crt") (get $files "notebooks-ca.crt")) }}
{{- $_ := set $files "proxy-client-ca_trust.crt" (printf "%s\n%s\n%s" (get $files "proxy-client-ca.crt") (get $files "hub-ca.crt") (get $files "notebooks-ca.crt")) }}
{{- end }}
{{- $_ := set .Release "hubSpawnerInternalSslCache" $files }}
{{- end }}
{{- toJson (get .Release "hubSpawnerInternalSslCache") }}
{{- end }}

{{/* The internal_ssl authorities' file names in the hub pod (key and certificate of each). */}}
{{- define "hub-spawner.internalSslAuthorities" -}}
{{- toJson (list "hub-ca" "notebooks-ca" "proxy-api-ca" "proxy-client-ca" "services-ca") }}
{{- end }}
