"""JupyterHub configuration of the hub-spawner Helm chart (static: the chart never templates it).

It reads two things, so that the same file also runs outside Kubernetes:

- ``values.json`` beside this file (or the file named by ``HUB_SPAWNER_CHART_VALUES``): the
  chart values it needs, ``{"cluster": {...}, "identity": {"mode", ...}, "spawner": {...},
  "hub": {"baseUrl", "config", "extraConfig"}}``, written by the chart into the Secret
  ``<fullname>-hub-values`` (hub.config may hold secrets) and mounted beside this file, which
  is in the hub's ConfigMap;
- environment variables, set by the hub Deployment, for every address and secret:

  - HUB_SPAWNER_HUB_BIND_URL -> JupyterHub.hub_bind_url (pod: ``http://:8081``)
  - HUB_SPAWNER_HUB_CONNECT_IP -> JupyterHub.hub_connect_ip (``<fullname>-hub``)
  - HUB_SPAWNER_PROXY_API_URL -> ConfigurableHTTPProxy.api_url
    (``http://<fullname>-proxy-api:8001``)
  - CONFIGPROXY_AUTH_TOKEN: the proxy's API token, read by JupyterHub itself; required
  - JPY_COOKIE_SECRET: the cookie secret (hex), read by JupyterHub itself
  - HUB_SPAWNER_DB_URL -> JupyterHub.db_url (SQLite on the PVC, or hub.db.url)
  - HUB_SPAWNER_TUNNEL_ADDRESS -> SSHBatchSpawner.tunnel_service_address
    (``<fullname>-tunnels:8765``)
  - HUB_SPAWNER_TUNNEL_TOKEN -> SSHBatchSpawner.tunnel_service_token
  - HUB_SPAWNER_TUNNEL_CONNECT_HOST -> SSHBatchSpawner.tunnel_connect_host
    (``<fullname>-tunnels``, the headless Service: the proxy's way to each forward)
  - HUB_SPAWNER_TUNNEL_BIND_IP -> SSHBatchSpawner.tunnel_bind_ip (default here: ``0.0.0.0``)
  - HUB_SPAWNER_SSH_KEY_PATH_TEMPLATE -> SSHBatchSpawner.ssh_key_path_template
    (``/etc/hub_spawner/keys/{username}``; identity.mode keys)
  - HUB_SPAWNER_SSH_CA_KEY_PATH -> SSHBatchSpawner.ssh_ca_key_path
    (``/etc/hub_spawner/ca/ca``; identity.mode certificate, where it is required)
  - JUPYTERHUB_CRYPT_KEY: the auth_state encryption key, read by JupyterHub itself; required
    with identity.mode authState
  - HUB_SPAWNER_KNOWN_HOSTS_PATH -> SSHBatchSpawner.known_hosts_path
    (``/etc/hub_spawner/known_hosts``)
  - with hub.internalSsl.enabled: HUB_SPAWNER_INTERNAL_SSL_CA_DIR, the five authorities'
    ``<name>.key`` and ``<name>.crt`` (JupyterHub.external_ssl_authorities; from the Secret
    ``<fullname>-internal-ssl``), and HUB_SPAWNER_INTERNAL_CERTS_LOCATION ->
    JupyterHub.internal_certs_location (a memory volume); both required

  An unset variable leaves the setting at JupyterHub's or the spawner's default, except
  HUB_SPAWNER_TUNNEL_BIND_IP, whose default here is 0.0.0.0.

identity.mode (values.json) picks how the spawner logs in as each cluster user: ``keys`` (a key
file per user, ssh_key_path_template), ``certificate`` (ssh_ca_key_path from the environment,
ssh_certificate_minutes from identity.certificateMinutes) or ``authState`` (auth_state_ssh_key /
auth_state_ssh_certificate from identity.authState.keyName / certificateName, and
Authenticator.enable_auth_state = True).

Order: the chart's settings, then ``hub.config`` ({Class: {trait: value}}, applied onto ``c``),
then each ``hub.extraConfig`` snippet in sorted name order (with ``c`` and ``chart_values`` in
scope): later wins. A spawner value not in values.json is not set: the spawner's default stays.
"""

from __future__ import annotations

import json
import os
import re
import sys

c = get_config()  # noqa: F821 - provided by JupyterHub (traitlets' PyFileConfigLoader)

# cluster.scheduler -> (entry point, spawner class)
SCHEDULERS = {
    "slurm": ("slurm-ssh", "SlurmSSHSpawner"),
    "sge": ("sge-ssh", "SGESSHSpawner"),
    "torque": ("torque-ssh", "TorqueSSHSpawner"),
}
# cluster.* -> SSHBatchSpawner trait (cluster.scheduler and cluster.knownHosts are handled apart)
CLUSTER_TRAITS = {
    "loginHost": "login_host",
    "loginHosts": "login_hosts",
    "loginPort": "login_port",
    "username": "cluster_username",
    "hubApiTunnelHost": "hub_api_tunnel_host",
    "hubApiTunnelHosts": "hub_api_tunnel_hosts",
    "hubConnectUrl": "hub_connect_url",
}


def load_values() -> dict:
    path = os.environ.get("HUB_SPAWNER_CHART_VALUES") or os.path.join(
        os.path.dirname(os.path.abspath(__file__)), "values.json"
    )
    with open(path) as f:
        return json.load(f)


def trait_name(key: str) -> str:
    """``defaultCpus`` -> ``default_cpus``: spawner.* keys are the traits in camelCase."""
    return re.sub(r"(?<!^)([A-Z])", r"_\1", key).lower()


def spawner_class(name: str) -> type:
    from hub_spawner import spawner

    return getattr(spawner, name)


def set_traits(section: str, cls: type, settings: dict, where: str) -> None:
    """Set ``c.<section>.<trait> = value`` for each camelCase key of ``settings``."""
    known = cls.class_trait_names(config=True)
    for key, value in settings.items():
        name = trait_name(key)
        if name not in known:
            raise ValueError(f"{where}.{key}: {cls.__name__} has no setting {name!r}")
        c[section][name] = value


chart_values = load_values()
cluster = chart_values.get("cluster", {})
identity = chart_values.get("identity", {})
spawner_values = dict(chart_values.get("spawner", {}))
hub_values = chart_values.get("hub", {})

# --- the spawner -------------------------------------------------------------------------------
scheduler = cluster.get("scheduler", "slurm")
if scheduler not in SCHEDULERS:
    raise ValueError(f"cluster.scheduler: {scheduler!r} is not one of {', '.join(SCHEDULERS)}")
entry_point, class_name = SCHEDULERS[scheduler]
c.JupyterHub.spawner_class = entry_point

for key, trait in CLUSTER_TRAITS.items():
    if key in cluster:
        c.SSHBatchSpawner[trait] = cluster[key]

# Scheduler-specific settings (spawner.slurm, spawner.sge) go to that scheduler's class.
for other in SCHEDULERS:
    block = spawner_values.pop(other, None)
    if block is None:
        continue
    if other != scheduler:
        raise ValueError(f"spawner.{other} is set, but cluster.scheduler is {scheduler!r}")
    set_traits(class_name, spawner_class(class_name), block, f"spawner.{other}")
set_traits("SSHBatchSpawner", spawner_class("SSHBatchSpawner"), spawner_values, "spawner")

# --- addresses and secrets (environment) -------------------------------------------------------
ENV_SETTINGS = [
    ("HUB_SPAWNER_HUB_BIND_URL", "JupyterHub", "hub_bind_url"),
    ("HUB_SPAWNER_HUB_CONNECT_IP", "JupyterHub", "hub_connect_ip"),
    ("HUB_SPAWNER_DB_URL", "JupyterHub", "db_url"),
    ("HUB_SPAWNER_PROXY_API_URL", "ConfigurableHTTPProxy", "api_url"),
    ("HUB_SPAWNER_TUNNEL_ADDRESS", "SSHBatchSpawner", "tunnel_service_address"),
    ("HUB_SPAWNER_TUNNEL_TOKEN", "SSHBatchSpawner", "tunnel_service_token"),
    ("HUB_SPAWNER_TUNNEL_CONNECT_HOST", "SSHBatchSpawner", "tunnel_connect_host"),
    ("HUB_SPAWNER_SSH_KEY_PATH_TEMPLATE", "SSHBatchSpawner", "ssh_key_path_template"),
    ("HUB_SPAWNER_SSH_CA_KEY_PATH", "SSHBatchSpawner", "ssh_ca_key_path"),
    ("HUB_SPAWNER_KNOWN_HOSTS_PATH", "SSHBatchSpawner", "known_hosts_path"),
]
for variable, section, trait in ENV_SETTINGS:
    if os.environ.get(variable):
        c[section][trait] = os.environ[variable]

# --- the SSH identity (identity.mode) ----------------------------------------------------------
IDENTITY_MODES = ("keys", "certificate", "authState")
identity_mode = identity.get("mode", "keys")
if identity_mode not in IDENTITY_MODES:
    raise ValueError(
        f"identity.mode: {identity_mode!r} is not one of {', '.join(IDENTITY_MODES)}"
    )
if os.environ.get("HUB_SPAWNER_SSH_CA_KEY_PATH") and identity_mode != "certificate":
    raise ValueError(
        f"HUB_SPAWNER_SSH_CA_KEY_PATH is set, but identity.mode is {identity_mode!r}: "
        "the CA key is used in mode certificate only"
    )
if identity_mode == "certificate":
    if not os.environ.get("HUB_SPAWNER_SSH_CA_KEY_PATH"):
        raise ValueError(
            "identity.mode is certificate, but HUB_SPAWNER_SSH_CA_KEY_PATH (the SSH user-CA "
            "private key, ssh_ca_key_path) is not set"
        )
    if "certificateMinutes" in identity:
        c.SSHBatchSpawner.ssh_certificate_minutes = identity["certificateMinutes"]
elif identity_mode == "authState":
    auth_state = identity.get("authState", {})
    if not auth_state.get("keyName"):
        raise ValueError("identity.mode is authState, but identity.authState.keyName is empty")
    if not os.environ.get("JUPYTERHUB_CRYPT_KEY"):
        raise ValueError(
            "identity.mode is authState, but JUPYTERHUB_CRYPT_KEY is not set: auth_state (the "
            "users' SSH keys) is stored encrypted with it"
        )
    c.Authenticator.enable_auth_state = True
    c.SSHBatchSpawner.auth_state_ssh_key = auth_state["keyName"]
    if auth_state.get("certificateName"):
        c.SSHBatchSpawner.auth_state_ssh_certificate = auth_state["certificateName"]

# --- TLS inside (hub.internalSsl) --------------------------------------------------------------
AUTHORITIES = ("hub-ca", "notebooks-ca", "proxy-api-ca", "proxy-client-ca", "services-ca")


def copy_authorities(source: str, target: str) -> None:
    """The chart's authorities from ``source`` (read-only) into ``target`` (0700; keys 0600,
    certificates 0644), and hub-ca's certificate also where the idle culler looks for it
    (``<certs location>/hub-ca/hub-ca.crt``, which JupyterHub writes only for authorities of
    its own). Nothing happens when ``source`` is not there (the config read outside a pod)."""
    if not os.path.isdir(source):
        return
    culler_dir = os.path.join(os.path.dirname(target), "hub-ca")
    for directory in (target, culler_dir):
        os.makedirs(directory, mode=0o700, exist_ok=True)
    copies = [(f"{name}.{ext}", target, 0o600 if ext == "key" else 0o644)
              for name in AUTHORITIES for ext in ("key", "crt")]
    copies.append(("hub-ca.crt", culler_dir, 0o644))
    for name, directory, mode in copies:
        if not os.path.exists(os.path.join(source, name)):
            continue
        with open(os.path.join(source, name), "rb") as file:
            data = file.read()
        path = os.path.join(directory, name)
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
        with os.fdopen(descriptor, "wb") as file:
            file.write(data)
        os.chmod(path, mode)

if hub_values.get("internalSsl", {}).get("enabled"):
    # certipy must name the chart's authorities as they name themselves, or OpenSSL (the
    # proxy's, the servers') cannot chain what the hub signs: hub_spawner/certificates.py.
    from hub_spawner.certificates import alt_name, copy_issuer_key_ids

    ca_dir = os.environ.get("HUB_SPAWNER_INTERNAL_SSL_CA_DIR", "")
    certs_location = os.environ.get("HUB_SPAWNER_INTERNAL_CERTS_LOCATION", "")
    if not ca_dir or not certs_location:
        raise ValueError(
            "hub.internalSsl.enabled, but HUB_SPAWNER_INTERNAL_SSL_CA_DIR (the authorities "
            "from the Secret <fullname>-internal-ssl) or HUB_SPAWNER_INTERNAL_CERTS_LOCATION "
            "is not set"
        )
    c.JupyterHub.internal_ssl = True
    c.JupyterHub.internal_certs_location = certs_location
    copy_issuer_key_ids()
    # The chart's authorities, so that the proxy (its own Deployment, with certificates from
    # the same Secret) and the hub trust each other; the hub signs its own certificate and
    # each server's with them.
    # certipy chmods every file it opens (0600 / 0644), which the read-only Secret volume
    # refuses (EROFS): the hub uses copies in its memory volume.
    authorities_dir = os.path.join(certs_location, "chart-authorities")
    copy_authorities(ca_dir, authorities_dir)
    c.JupyterHub.external_ssl_authorities = {
        name: {"key": os.path.join(authorities_dir, f"{name}.key"),
               "cert": os.path.join(authorities_dir, f"{name}.crt")}
        for name in AUTHORITIES
    }
    # The hub's certificate names it as the proxy reaches it (its Service) and as the
    # servers reach it (the login node, through the hub-API reverse forward).
    c.JupyterHub.trusted_alt_names = [
        alt_name(host) for host in (os.environ.get("HUB_SPAWNER_HUB_CONNECT_IP", ""),
                                    cluster.get("hubApiTunnelHost", ""),
                                    *cluster.get("hubApiTunnelHosts", {}).values())
        if host
    ]

# The tunnel service listens on all of its pod's addresses; the proxy connects to
# tunnel_connect_host (the tunnel service's headless Service name).
c.SSHBatchSpawner.tunnel_bind_ip = os.environ.get("HUB_SPAWNER_TUNNEL_BIND_IP", "0.0.0.0")

# The proxy is its own Deployment and the servers are batch jobs: neither is the hub's to start
# or stop, so a hub restart drops no user connection.
c.ConfigurableHTTPProxy.should_start = False
c.JupyterHub.cleanup_servers = False
if not os.environ.get("CONFIGPROXY_AUTH_TOKEN"):
    raise ValueError(
        "CONFIGPROXY_AUTH_TOKEN is not set: the proxy runs as its own service "
        "(should_start = False) and the hub needs its API token"
    )
base_url = hub_values.get("baseUrl", "/")
if base_url.strip("/"):
    c.JupyterHub.base_url = base_url

# --- the idle culler (cull) --------------------------------------------------------------------
# A server nobody uses holds a batch job (cores, memory, GPUs) until its walltime: the culler
# stops it, and the spawner cancels its job. A managed service of the hub, in the hub's pod.
cull = chart_values.get("cull", {})
if cull.get("enabled", True):
    culler = [sys.executable, "-m", "jupyterhub_idle_culler",
              f"--timeout={int(cull.get('timeout', 3600))}",
              f"--cull-every={int(cull.get('every', 600))}"]
    if cull.get("maxAge"):
        culler.append(f"--max-age={int(cull['maxAge'])}")
    if cull.get("users"):
        culler.append("--cull-users")
    if hub_values.get("internalSsl", {}).get("enabled"):  # its own TLS settings
        culler += ["--ssl-enabled=true",
                   f"--internal-certs-location={c.JupyterHub.internal_certs_location}"]
    c.JupyterHub.services = [{"name": "idle-culler", "command": culler}]
    scopes = ["list:users", "read:users:activity", "read:servers", "delete:servers"]
    if cull.get("users"):
        scopes.append("admin:users")
    c.JupyterHub.load_roles = [
        {"name": "idle-culler", "scopes": scopes, "services": ["idle-culler"]}]

# --- hub.config, then hub.extraConfig ----------------------------------------------------------
for section, traits in sorted(hub_values.get("config", {}).items()):
    if not isinstance(traits, dict):
        raise ValueError(f"hub.config.{section} must be a mapping of trait names to values")
    for trait, value in traits.items():
        c[section][trait] = value

extra_namespace = {"c": c, "chart_values": chart_values, "__name__": "hub_extra_config"}
for name, source in sorted(hub_values.get("extraConfig", {}).items()):
    exec(compile(source, f"<hub.extraConfig.{name}>", "exec"), extra_namespace)
