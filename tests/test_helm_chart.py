"""The Helm chart (helm/hub-spawner), offline: render, lint, schema, Kubernetes schemas, YAML lint,
and the rendered hub configuration run through traitlets as ``jupyterhub -f`` would.

No Kubernetes here: ``helm upgrade``'s ``lookup`` of the existing Secret is served by a local
stand-in for the API (tests/helm_chart.py ``fake_api``, on 127.0.0.1).
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests import helm_chart as chart

KUBE_VERSIONS = ["1.27.0", "1.37.0"]  # oldest and newest supported (Chart.yaml kubeVersion)
FULLNAME = "hub-hub-spawner"  # release "hub", chart "hub-spawner"


@pytest.fixture
def values() -> dict:
    return chart.load_values(chart.SLURM_VALUES)


@pytest.fixture
def manifests(values) -> list[dict]:
    return chart.render(values)


def with_changes(values: dict, changes: dict) -> dict:
    """``values`` with ``changes`` merged in (dicts recursively; None deletes a key), as
    ``helm -f values -f changes`` merges them."""
    return chart.merge_values(values, changes)


# A variant that takes the other branches of the templates.
VARIANT = {
    "hub": {"db": {"type": "other", "url": "postgresql://hub:pw@db:5432/jupyterhub"},
            "baseUrl": "/jupyter/"},
    "proxy": {"service": {"type": "NodePort", "nodePort": 30080}},
    "identity": {"resyncSeconds": 0},
    "networkPolicy": {"enabled": False},
    "tunnels": {"forwardPorts": {"low": 21000, "high": 21099}, "pvc": {"storageClassName": "ssd"}},
}

# The identity modes (identity.mode), as changes to the Slurm values. Certificate: the README's
# overlay file (values-certificate.yaml) alone.
CERTIFICATE = chart.load_values(chart.CERTIFICATE_VALUES)
AUTH_STATE = {"identity": {"mode": "authState", "authState": {
    "keyName": "ssh_key", "certificateName": "ssh_certificate"}}}
MODES = {"keys": {}, "certificate": CERTIFICATE, "authState": AUTH_STATE}
CA_KEY_PATH = "/etc/hub_spawner/ca/ca"

# What lint, the Kubernetes schemas and yamllint check: the Slurm values, the variant, and the
# Slurm values in each other identity mode.
# The users' way in: an Ingress, and the proxy serving TLS itself.
WAY_IN = {"ingress": {"enabled": True, "ingressClassName": "nginx",
                      "hosts": ["jupyter.example.org"],
                      "tls": [{"hosts": ["jupyter.example.org"], "secretName": "jupyter-tls"}]},
          "proxy": {"https": {"enabled": True, "secret": {"name": "jupyter-tls"}}}}
VARIANTS = {"slurm": {}, "variant": VARIANT, "certificate": CERTIFICATE, "authState": AUTH_STATE,
            "way-in": WAY_IN}


# --- render, lint, schema ----------------------------------------------------------------------


def test_renders_every_object(manifests):
    assert sorted((m["kind"], m["metadata"]["name"]) for m in manifests) == sorted([
        ("ConfigMap", f"{FULLNAME}-hub"),
        ("ConfigMap", f"{FULLNAME}-known-hosts"),
        ("Deployment", f"{FULLNAME}-hub"),
        ("Deployment", f"{FULLNAME}-proxy"),
        ("Deployment", f"{FULLNAME}-tunnels"),
        ("NetworkPolicy", f"{FULLNAME}-hub"),
        ("NetworkPolicy", f"{FULLNAME}-proxy"),
        ("NetworkPolicy", f"{FULLNAME}-tunnels"),
        ("PersistentVolumeClaim", f"{FULLNAME}-hub-db"),
        ("PersistentVolumeClaim", f"{FULLNAME}-tunnels-state"),
        ("Secret", f"{FULLNAME}-hub-values"),
        ("Secret", f"{FULLNAME}-internal-ssl"),
        ("Secret", f"{FULLNAME}-secret"),
        ("Service", f"{FULLNAME}-hub"),
        ("Service", f"{FULLNAME}-proxy-api"),
        ("Service", f"{FULLNAME}-proxy-public"),
        ("Service", f"{FULLNAME}-tunnels"),
    ])


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("kube_version", KUBE_VERSIONS)
def test_lint_strict(values, kube_version, variant):
    report = chart.lint(with_changes(values, VARIANTS[variant]), kube_version=f"v{kube_version}")
    assert report["errors"] == []
    # strict: warnings count; only the informational "icon is recommended" may remain
    assert [m for m in report["messages"] if m["severity"] >= 2] == []


def test_chart_defaults_alone_name_the_required_values():
    report = chart.lint({})
    assert any("loginHost" in e and "knownHosts" in e for e in report["errors"]), report


SCHEMA_REJECTIONS = [
    ("wrong type", {"cluster": {"loginPort": "ssh"}}, "/cluster/loginPort", "want integer"),
    ("unknown scheduler", {"cluster": {"scheduler": "lsf"}}, "/cluster/scheduler",
     "'slurm', 'sge', 'torque'"),
    ("missing login host", {"cluster": {"loginHost": None}}, "/cluster", "'loginHost'"),
    ("empty login host", {"cluster": {"loginHost": ""}}, "/cluster/loginHost", "minLength"),
    ("missing known_hosts", {"cluster": {"knownHosts": None}}, "/cluster", "'knownHosts'"),
    ("no way to the hub API", {"cluster": {"hubApiTunnelHost": None}}, "/cluster",
     "missing property 'hubApiTunnelHost'"),
    ("hub connect URL not a URL", {"cluster": {"hubConnectUrl": "hub:8081"}},
     "/cluster/hubConnectUrl", "does not match pattern"),
    ("unknown top-level key", {"clusters": {}}, "additional properties 'clusters'", ""),
    ("unknown spawner key", {"spawner": {"maxCPUs": 4}}, "/spawner", "'maxCPUs'"),
    ("port out of range", {"proxy": {"service": {"port": 70000}}}, "/proxy/service/port",
     "want 65,535"),
    ("forward port below 1024", {"tunnels": {"forwardPorts": {"low": 80}}},
     "/tunnels/forwardPorts/low", "want 1,024"),
    ("cookie secret not hex", {"hub": {"cookieSecret": "not-hex"}}, "/hub/cookieSecret", ""),
    ("short tunnel token", {"tunnels": {"token": "short"}}, "/tunnels/token", ""),
    ("external db without url", {"hub": {"db": {"type": "other"}}}, "/hub/db/url", "minLength"),
    ("hub.config section not a mapping", {"hub": {"config": {"JupyterHub": 3}}},
     "/hub/config/JupyterHub", "want object"),
    ("check port not an integer", {"hub": {"checkPort": "8082"}}, "/hub/checkPort",
     "want integer"),
    ("check port below 1024", {"hub": {"checkPort": 80}}, "/hub/checkPort", "want 1,024"),
    ("unknown identity mode", {"identity": {"mode": "password"}}, "/identity/mode",
     "'keys', 'certificate', 'authState'"),
    ("certificate mode without CA secret name", {"identity": {"mode": "certificate"}},
     "/identity/caKeySecret/name", "minLength"),
    ("CA secret key not a Secret key", {"identity": {"caKeySecret": {"key": "ca/key"}}},
     "/identity/caKeySecret/key", "does not match pattern"),
    ("unknown CA secret key", {"identity": {"caKeySecret": {"secret": "x"}}},
     "/identity/caKeySecret", "additional properties 'secret'"),
    ("certificate minutes 0", {"identity": {"certificateMinutes": 0}},
     "/identity/certificateMinutes", "minimum: got 0, want 1"),
    ("certificate minutes above a day", {"identity": {"certificateMinutes": 1441}},
     "/identity/certificateMinutes", "want 1,440"),
    ("certificate minutes not a number", {"identity": {"certificateMinutes": "10"}},
     "/identity/certificateMinutes", "want number"),
    ("auth_state mode without key name", {"identity": {"mode": "authState"}},
     "/identity/authState/keyName", "minLength"),
    ("unknown auth_state key", {"identity": {"authState": {"key": "ssh_key"}}},
     "/identity/authState", "additional properties 'key'"),
    ("crypt key not hex", {"hub": {"cryptKey": "not-hex"}}, "/hub/cryptKey", ""),
]


@pytest.mark.parametrize("changes,where,what", [r[1:] for r in SCHEMA_REJECTIONS],
                         ids=[r[0] for r in SCHEMA_REJECTIONS])
def test_schema_rejects(values, changes, where, what):
    bad = with_changes(values, changes)
    with pytest.raises(chart.sdk().HelmValuesError) as rendering:
        chart.render(bad)
    message = str(rendering.value)
    assert where in message and what in message, message
    # helm lint (and so helm install) says the same
    report = chart.lint(bad)
    assert any(where in error and what in error for error in report["errors"]), report


@pytest.mark.parametrize("cull,command,scopes", [
    ({"enabled": False}, None, None),
    ({"timeout": 7200, "every": 300, "maxAge": 86400, "users": True},
     ["--timeout=7200", "--cull-every=300", "--max-age=86400", "--cull-users"], "admin:users"),
])
def test_the_idle_culler_follows_cull(values, tmp_path, cull, command, scopes):
    c = chart.load_hub_config(chart.render(with_changes(values, {"cull": cull})), tmp_path)
    if command is None:
        assert "services" not in c.JupyterHub and "load_roles" not in c.JupyterHub
        return
    [culler] = c.JupyterHub.services
    assert culler["command"][3:3 + len(command)] == command
    assert scopes in c.JupyterHub.load_roles[0]["scopes"]


def test_a_hub_that_compute_nodes_reach_directly_needs_no_tunnel_host(values, tmp_path):
    """cluster.hubConnectUrl instead of hubApiTunnelHost: the spawner's hub_connect_url."""
    changes = {"cluster": {"hubApiTunnelHost": None,
                           "hubConnectUrl": "https://hub.example.org:8081"}}
    c = chart.load_hub_config(chart.render(with_changes(values, changes)), tmp_path)
    assert c.SSHBatchSpawner.hub_connect_url == "https://hub.example.org:8081"
    assert "hub_api_tunnel_host" not in c.SSHBatchSpawner


@pytest.mark.parametrize("changes,message", [
    ({"tunnels": {"forwardPorts": {"low": 21000, "high": 20000}}},
     "tunnels.forwardPorts: high (20000) must not be below low (21000)"),
    ({"tunnels": {"controlPort": 20500}},
     "tunnels.controlPort (20500) must lie outside tunnels.forwardPorts (20000-20999)"),
    ({"hub": {"checkPort": 8081}},
     "hub.checkPort (8081) must differ from the hub's own port, 8081"),
])
def test_template_checks(values, changes, message):
    with pytest.raises(chart.sdk().HelmRenderError, match=re.escape(message)):
        chart.render(with_changes(values, changes))


# --- Kubernetes schemas, YAML lint -------------------------------------------------------------


def kubernetes_validate() -> str:
    path = Path(sys.executable).with_name("kubernetes-validate")
    found = str(path) if path.exists() else shutil.which("kubernetes-validate")
    if not found:
        pytest.fail("kubernetes-validate is not installed: "
                    "pip install -r tests/lab/requirements.txt")
    return found


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("kube_version", KUBE_VERSIONS)
def test_manifests_validate_against_kubernetes(values, tmp_path, kube_version, variant):
    values = with_changes(values, VARIANTS[variant])
    count = len(chart.render(values))
    rendered = tmp_path / "rendered.yaml"
    rendered.write_text(chart.render_yaml(values))
    result = subprocess.run(
        [kubernetes_validate(), "--strict", "-k", kube_version, str(rendered)],
        capture_output=True, text=True, timeout=300,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    major_minor = kube_version.rsplit(".", 1)[0]
    assert output.count("passed for resource") == count, output
    assert output.count(f"against version {major_minor}") == count, output


# yamllint's default rules, except: line-length (values.json, long image names and the hub's
# Python are long lines by nature), and indentation's indent-sequences (toYaml writes lists
# unindented under their key, the templates indent them).
YAMLLINT_CONFIG = """
extends: default
rules:
  line-length: disable
  indentation:
    spaces: consistent
    indent-sequences: whatever
"""


@pytest.mark.parametrize("variant", VARIANTS)
def test_rendered_yaml_lints_clean(values, variant):
    from yamllint import linter
    from yamllint.config import YamlLintConfig

    values = with_changes(values, VARIANTS[variant])
    text = chart.render_yaml(values)
    problems = list(linter.run(text, YamlLintConfig(YAMLLINT_CONFIG)))
    lines = text.splitlines()
    assert problems == [], "\n".join(
        f"{p.line}:{p.column} {p.level} {p.desc} ({p.rule}): {lines[p.line - 1]!r}"
        for p in problems
    )


# --- the hub's configuration -------------------------------------------------------------------


def test_hub_configuration(values, tmp_path):
    values = with_changes(values, {"hub": {"extraConfig": {
        # sorted order: "10-first" runs before "20-second", which sees what it set
        "20-second": "c.JupyterHub.concurrent_spawn_limit += 1",
        "10-first": "c.JupyterHub.concurrent_spawn_limit = 41\n"
                    "c.SlurmSSHSpawner.qos = chart_values['cluster']['loginHost'][:5]",
    }}})
    manifests = chart.render(values)
    secrets = chart.secret_data(manifests)
    c = chart.load_hub_config(manifests, tmp_path)

    assert c.JupyterHub.spawner_class == "slurm-ssh"
    assert c.ConfigurableHTTPProxy.should_start is False
    assert c.ConfigurableHTTPProxy.api_url == f"https://{FULLNAME}-proxy-api:8001"
    assert c.JupyterHub.cleanup_servers is False
    assert c.JupyterHub.hub_bind_url == "https://:8081"
    # internal_ssl on (hub.internalSsl's default), with the chart's authorities
    assert c.JupyterHub.internal_ssl is True
    assert c.JupyterHub.internal_certs_location == "/var/run/hub_spawner/internal-ssl"
    # copies in memory of the mounted /etc/hub_spawner/internal-ssl-ca (certipy chmods them)
    assert c.JupyterHub.external_ssl_authorities["notebooks-ca"] == {
        "key": "/var/run/hub_spawner/internal-ssl/chart-authorities/notebooks-ca.key",
        "cert": "/var/run/hub_spawner/internal-ssl/chart-authorities/notebooks-ca.crt"}
    assert sorted(c.JupyterHub.external_ssl_authorities) == [
        "hub-ca", "notebooks-ca", "proxy-api-ca", "proxy-client-ca", "services-ca"]
    assert c.JupyterHub.trusted_alt_names == [f"DNS:{FULLNAME}-hub",
                                              "DNS:login-ib0.cluster.example.org"]
    assert c.JupyterHub.hub_connect_ip == f"{FULLNAME}-hub"
    assert c.JupyterHub.db_url == "sqlite:////srv/jupyterhub/jupyterhub.sqlite"
    assert "base_url" not in c.JupyterHub

    spawner = c.SSHBatchSpawner
    assert spawner.tunnel_service_address == f"{FULLNAME}-tunnels:8765"
    assert spawner.tunnel_service_token == secrets["tunnels.token"]
    assert spawner.tunnel_bind_ip == "0.0.0.0"
    assert spawner.tunnel_connect_host == f"{FULLNAME}-tunnels"
    assert spawner.ssh_key_path_template == "/etc/hub_spawner/keys/{username}"
    assert spawner.known_hosts_path == "/etc/hub_spawner/known_hosts"
    assert spawner.login_host == "login.cluster.example.org"
    assert spawner.login_port == 22
    assert spawner.hub_api_tunnel_host == "login-ib0.cluster.example.org"
    assert spawner.job_prologue == "module load jupyter"
    assert spawner.partitions == ["interactive", "gpu"]
    assert spawner.default_partition == "interactive"
    assert (spawner.max_cpus, spawner.max_memory, spawner.max_gpus) == (16, "128G", 2)
    assert (spawner.default_walltime, spawner.max_walltime) == ("04:00:00", "1-00:00:00")
    assert (spawner.start_timeout, spawner.default_url) == (600, "/lab")
    assert c.SlurmSSHSpawner.gpu_gres == "gpu"
    # not in the values: not set, so the spawner's defaults stay
    for unset in ("cluster_username", "default_cpus", "default_memory", "default_account",
                  "job_python", "http_timeout"):
        assert unset not in spawner, unset

    # the idle culler (cull), on by default, with the role it needs
    [culler] = c.JupyterHub.services
    assert culler["name"] == "idle-culler"
    assert culler["command"][1:] == ["-m", "jupyterhub_idle_culler", "--timeout=3600",
                                     "--cull-every=600", "--ssl-enabled=true",
                                     "--internal-certs-location=/var/run/hub_spawner/internal-ssl"]
    assert c.JupyterHub.load_roles == [{
        "name": "idle-culler", "services": ["idle-culler"],
        "scopes": ["list:users", "read:users:activity", "read:servers", "delete:servers"]}]

    # hub.config, then hub.extraConfig in sorted order with c and chart_values in scope
    assert c.JupyterHub.authenticator_class == "github"
    assert c.JupyterHub.admin_users == ["alice"]
    assert c.GitHubOAuthenticator.client_id == "your-client-id"
    assert c.GitHubOAuthenticator.allowed_organizations == ["example-org"]
    assert c.JupyterHub.concurrent_spawn_limit == 42
    assert c.SlurmSSHSpawner.qos == "login"

    # the traits take these values (types included), as the hub will
    from jupyterhub.app import JupyterHub

    from hub_spawner.spawner import SlurmSSHSpawner

    live = SlurmSSHSpawner(config=c)
    assert (live.tunnel_service_address, live.max_cpus, live.qos) == (
        f"{FULLNAME}-tunnels:8765", 16, "login")
    assert live.cmd == ["jupyterhub-singleuser"]  # the default
    hub_config = copy.deepcopy(c)
    hub_config.JupyterHub.authenticator_class = "dummy"  # oauthenticator: in the image only
    app = JupyterHub(config=hub_config)
    assert app.hub_connect_ip == f"{FULLNAME}-hub"
    assert app.spawner_class is SlurmSSHSpawner


def test_every_spawner_value_reaches_its_trait(values, tmp_path):
    """Every key the schema allows under spawner.* names a real trait, with a type it takes."""
    schema = json.loads((chart.CHART_DIR / "values.schema.json").read_text())
    keys = schema["properties"]["spawner"]["properties"]
    examples = {"string": "x", "integer": 3, "number": 2.5, "array": ["a"], "boolean": True,
                "object": {}}
    special = {"defaultMemory": "4G", "maxMemory": "8G", "defaultWalltime": "01:00:00",
               "maxWalltime": "2-00:00:00", "remoteStateDir": ".hs", "jobPython": "python3",
               "cmd": ["jupyterhub-singleuser"], "defaultUrl": "/lab", "reconcile": "log",
               "hubId": "prod"}

    def example(key: str, spec: dict):
        if key in special:
            return special[key]
        if "enum" in spec:
            return spec["enum"][-1]
        if spec.get("type") == "array" and spec.get("items", {}).get("type") == "object":
            return []  # presets, clusters: their content is the spawner's own tests' business
        return examples.get(spec.get("type"), "x" if "anyOf" in spec else None)

    spawner_values = {key: example(key, spec) for key, spec in keys.items()
                      if key not in ("slurm", "sge", "torque")}
    assert None not in spawner_values.values(), spawner_values
    spawner_values["slurm"] = {"qos": "short", "gpuGres": "gpu"}
    manifests = chart.render(with_changes(values, {"spawner": spawner_values}))
    c = chart.load_hub_config(manifests, tmp_path)

    from hub_spawner.spawner import SGESSHSpawner, SlurmSSHSpawner

    live = SlurmSSHSpawner(config=c)
    for key, value in spawner_values.items():
        if key == "slurm":
            continue
        name = re.sub(r"(?<!^)([A-Z])", r"_\1", key).lower()
        assert getattr(live, name) == value, key
    assert (live.qos, live.gpu_gres) == ("short", "gpu")

    sge = with_changes(values, {"cluster": {"scheduler": "sge"}, "spawner": {"slurm": None, "sge": {
        "parallelEnvironment": "mpi", "memoryResource": "mem_free", "gpuResource": "gpus"}}})
    c = chart.load_hub_config(chart.render(sge), tmp_path / "sge")
    assert c.JupyterHub.spawner_class == "sge-ssh"
    live = SGESSHSpawner(config=c)
    assert (live.parallel_environment, live.memory_resource, live.gpu_resource) == (
        "mpi", "mem_free", "gpus")

    c = chart.load_hub_config(
        chart.render(with_changes(values, {"cluster": {"scheduler": "torque"},
                                           "spawner": {"slurm": None}})), tmp_path / "t")
    assert c.JupyterHub.spawner_class == "torque-ssh"


def test_hub_configuration_refuses_mismatched_or_missing(values, tmp_path):
    manifests = chart.render(with_changes(values, {"spawner": {"sge": {"gpuResource": "gpu"}}}))
    with pytest.raises(ValueError, match="spawner.sge is set, but cluster.scheduler is 'slurm'"):
        chart.load_hub_config(manifests, tmp_path)
    manifests = chart.render(values)
    env = {**chart.hub_env(manifests), "CONFIGPROXY_AUTH_TOKEN": None}
    with pytest.raises(ValueError, match="CONFIGPROXY_AUTH_TOKEN is not set"):
        chart.load_hub_config(manifests, tmp_path / "2", env=env)


def test_hub_configuration_runs_outside_kubernetes(values, tmp_path):
    """The same file, values.json named by HUB_SPAWNER_CHART_VALUES and addresses from env."""
    manifests = chart.render(values)
    source, chart_values = chart.hub_config_files(manifests)
    chart_values["cluster"]["loginHost"] = "10.77.0.2"
    (tmp_path / "elsewhere.json").write_text(json.dumps(chart_values))
    (tmp_path / "conf").mkdir()
    (tmp_path / "conf" / "jupyterhub_config.py").write_text(source)

    from traitlets.config.loader import PyFileConfigLoader

    env = {"HUB_SPAWNER_CHART_VALUES": str(tmp_path / "elsewhere.json"),
           "CONFIGPROXY_AUTH_TOKEN": "t" * 32, "HUB_SPAWNER_TUNNEL_ADDRESS": None,
           "HUB_SPAWNER_PROXY_API_URL": "http://127.0.0.1:8001",
           "HUB_SPAWNER_SSH_KEY_PATH_TEMPLATE": "/srv/lab/keys/{username}",
           "HUB_SPAWNER_HUB_CONNECT_IP": "10.77.0.1",
           "HUB_SPAWNER_INTERNAL_SSL_CA_DIR": None,
           "HUB_SPAWNER_INTERNAL_CERTS_LOCATION": str(tmp_path / "certs")}
    with chart.environment(env), pytest.raises(ValueError, match="HUB_SPAWNER_INTERNAL_SSL_CA_DIR"):
        PyFileConfigLoader("jupyterhub_config.py", path=str(tmp_path / "conf")).load_config()
    env["HUB_SPAWNER_INTERNAL_SSL_CA_DIR"] = str(tmp_path / "cas")
    with chart.environment(env):
        c = PyFileConfigLoader("jupyterhub_config.py", path=str(tmp_path / "conf")).load_config()
    assert c.JupyterHub.internal_certs_location == str(tmp_path / "certs")
    assert c.JupyterHub.trusted_alt_names == ["IP:10.77.0.1", "DNS:login-ib0.cluster.example.org"]
    assert c.SSHBatchSpawner.login_host == "10.77.0.2"
    assert c.SSHBatchSpawner.ssh_key_path_template == "/srv/lab/keys/{username}"
    assert c.ConfigurableHTTPProxy.api_url == "http://127.0.0.1:8001"
    assert "tunnel_service_address" not in c.SSHBatchSpawner  # the spawner starts its own


def test_base_url_reaches_config_probes_and_proxy(values, tmp_path):
    manifests = chart.render(with_changes(values, {"hub": {"baseUrl": "/jupyter",
                                                           "internalSsl": {"enabled": False}}}))
    c = chart.load_hub_config(manifests, tmp_path)
    assert c.JupyterHub.base_url == "/jupyter/"
    hub = chart.container(chart.hub_deployment(manifests), "hub")
    assert hub["livenessProbe"]["httpGet"]["path"] == "/jupyter/hub/health"
    assert hub["readinessProbe"]["httpGet"]["path"] == "/jupyter/hub/health"
    assert (f"--error-target=http://{FULLNAME}-hub:8081/jupyter/hub/error"
            in chart.command_line(chart.proxy_deployment(manifests), "chp"))


# --- secrets -----------------------------------------------------------------------------------


def test_generated_secrets(manifests):
    secrets = chart.secret_data(manifests)
    assert set(secrets) == {"hub.cookie-secret", "hub.crypt-key", "proxy.auth-token",
                            "tunnels.token"}
    for value in secrets.values():
        assert re.fullmatch("[0-9a-f]{64}", value)  # 32 random bytes, hex
    assert len(set(secrets.values())) == 4
    # the pods' restart checksums are of the very values in the Secret (computed once)
    proxy = chart.proxy_deployment(manifests)["spec"]["template"]["metadata"]["annotations"]
    assert proxy["checksum/auth-token"] == hashlib.sha256(
        secrets["proxy.auth-token"].encode()).hexdigest()[:16]
    tunnels = chart.tunnels_deployment(manifests)["spec"]["template"]["metadata"]["annotations"]
    assert tunnels["checksum/token"] == hashlib.sha256(
        secrets["tunnels.token"].encode()).hexdigest()[:16]
    env = chart.hub_env(manifests)
    assert env["JPY_COOKIE_SECRET"] == secrets["hub.cookie-secret"]
    assert env["CONFIGPROXY_AUTH_TOKEN"] == secrets["proxy.auth-token"]
    assert env["HUB_SPAWNER_TUNNEL_TOKEN"] == secrets["tunnels.token"]
    assert chart.tunnels_env(manifests)["HUB_SPAWNER_TUNNEL_TOKEN"] == secrets["tunnels.token"]
    assert chart.container_env(manifests, chart.proxy_deployment(manifests), "chp")[
        "CONFIGPROXY_AUTH_TOKEN"] == secrets["proxy.auth-token"]


def test_user_provided_secrets_are_used(values):
    given = {"hub": {"cookieSecret": "ab" * 32, "cryptKey": "cd" * 32},
             "proxy": {"secretToken": "p" * 40}, "tunnels": {"token": "t" * 48}}
    manifests = chart.render(with_changes(values, given))
    assert chart.secret_data(manifests) == {
        "hub.cookie-secret": "ab" * 32, "hub.crypt-key": "cd" * 32, "proxy.auth-token": "p" * 40,
        "tunnels.token": "t" * 48}
    env = chart.hub_env(manifests)
    assert (env["JPY_COOKIE_SECRET"], env["CONFIGPROXY_AUTH_TOKEN"],
            env["HUB_SPAWNER_TUNNEL_TOKEN"]) == ("ab" * 32, "p" * 40, "t" * 48)
    assert chart.tunnels_env(manifests)["HUB_SPAWNER_TUNNEL_TOKEN"] == "t" * 48


def test_a_checksum_of_only_digits_stays_a_string(values):
    """A restart checksum is an annotation, which Kubernetes takes only as a string.

    These tokens were picked so that their hash's first 16 hex digits are all decimal digits:
    unquoted, YAML reads them as a number and the API server refuses the Deployment (a random
    token does this about once in 2000 installs; `make fresh-check` met one).
    """
    given = {"proxy": {"secretToken": f"{0xce2:040x}"}, "tunnels": {"token": f"{0x1145:040x}"}}
    manifests = chart.render(with_changes(values, given))
    proxy = chart.proxy_deployment(manifests)["spec"]["template"]["metadata"]["annotations"]
    tunnels = chart.tunnels_deployment(manifests)["spec"]["template"]["metadata"]["annotations"]
    assert proxy["checksum/auth-token"] == "7655580372585772"
    assert tunnels["checksum/token"] == "2691570495963755"
    hub = chart.hub_deployment(manifests)["spec"]["template"]["metadata"]["annotations"]
    assert all(isinstance(value, str) for value in {**proxy, **tunnels, **hub}.values())


def test_upgrade_keeps_the_secrets(values):
    first = chart.render(values)
    stored = stored_secrets(first)
    upgraded = chart.render(values, existing=stored)
    assert chart.secret_data(upgraded) == chart.secret_data(first)
    tls = f"{FULLNAME}-internal-ssl"
    assert chart.secret_data(upgraded, tls) == chart.secret_data(first, tls)
    assert chart.secret_data(chart.render(values), tls) != chart.secret_data(first, tls)
    # and so the pods' checksums stay, and an upgrade restarts neither proxy nor tunnels
    for deployment in (chart.proxy_deployment, chart.tunnels_deployment, chart.hub_deployment):
        assert (deployment(upgraded)["spec"]["template"]["metadata"]["annotations"]
                == deployment(first)["spec"]["template"]["metadata"]["annotations"])
    # a value set by the user wins over the stored one (rotation)
    rotated = chart.render(with_changes(values, {"tunnels": {"token": "r" * 40}}),
                           existing=stored)
    data = chart.secret_data(rotated)
    assert data["tunnels.token"] == "r" * 40
    assert data["proxy.auth-token"] == chart.secret_data(first)["proxy.auth-token"]


def test_external_database_url_is_a_secret(values, tmp_path):
    url = "postgresql://hub:pw@db:5432/jupyterhub"
    manifests = chart.render(with_changes(values, {"hub": {"db": {"type": "other", "url": url}}}))
    assert chart.secret_data(manifests)["hub.db-url"] == url
    assert url not in json.dumps(chart.find(manifests, "ConfigMap", f"{FULLNAME}-hub"))
    assert chart.load_hub_config(manifests, tmp_path).JupyterHub.db_url == url
    assert not [p for p in chart.find_all(manifests, "PersistentVolumeClaim")
                if p["metadata"]["name"].endswith("-hub-db")]
    volumes = chart.hub_deployment(manifests)["spec"]["template"]["spec"]["volumes"]
    assert next(v for v in volumes if v["name"] == "hub-data") == {"name": "hub-data",
                                                                    "emptyDir": {}}


def test_hub_values_are_in_a_secret_not_a_configmap(values, tmp_path):
    """hub.config / hub.extraConfig (authenticators' client secrets) reach values.json, which is
    in the Secret <fullname>-hub-values, mounted beside the ConfigMap's jupyterhub_config.py."""
    client_secret = "client-secret-" + "9f" * 16
    snippet_secret = "snippet-secret-" + "7e" * 16
    manifests = chart.render(with_changes(values, {"hub": {
        "config": {"GitHubOAuthenticator": {"client_secret": client_secret}},
        "extraConfig": {"50-secret": f"c.JupyterHub.api_tokens = {{{snippet_secret!r}: 'x'}}"},
    }}))
    for secret in (client_secret, snippet_secret):
        for kind in ("ConfigMap", "Deployment", "NetworkPolicy", "Service"):
            assert secret not in json.dumps(chart.find_all(manifests, kind)), (secret, kind)

    config_map = chart.find(manifests, "ConfigMap", f"{FULLNAME}-hub")
    assert set(config_map["data"]) == {"jupyterhub_config.py"}
    stored = chart.find(manifests, "Secret", f"{FULLNAME}-hub-values")
    assert stored["type"] == "Opaque" and set(stored["data"]) == {"values.json"}
    assert stored["metadata"]["labels"]["component"] == "hub"
    values_json = json.loads(chart.secret_data(manifests, f"{FULLNAME}-hub-values")["values.json"])
    assert values_json["hub"]["config"]["GitHubOAuthenticator"]["client_secret"] == client_secret
    assert snippet_secret in values_json["hub"]["extraConfig"]["50-secret"]
    # the pod's view (one projected volume) is what the helpers hand out
    source, seen = chart.hub_config_files(manifests)
    assert seen == values_json
    assert source == config_map["data"]["jupyterhub_config.py"]

    # write_hub_config lays the directory out as the pod mounts it, and the config reads it
    path = chart.write_hub_config(manifests, tmp_path / "etc")
    assert path == tmp_path / "etc" / "jupyterhub_config.py"
    assert sorted(p.name for p in path.parent.iterdir()) == ["jupyterhub_config.py", "values.json"]
    assert json.loads((path.parent / "values.json").read_text()) == values_json
    assert path.read_text() == source
    c = chart.load_hub_config(manifests, tmp_path / "load")
    assert c.GitHubOAuthenticator.client_secret == client_secret
    assert c.JupyterHub.api_tokens == {snippet_secret: "x"}

    # only the hub pod mounts it
    for deployment in (chart.proxy_deployment(manifests), chart.tunnels_deployment(manifests)):
        assert f"{FULLNAME}-hub-values" not in json.dumps(deployment)
    assert chart.mounted_files(manifests, chart.hub_deployment(manifests), "hub",
                               chart.HUB_CONFIG_DIR).keys() == {"jupyterhub_config.py",
                                                                "values.json"}


# --- the tunnel service and the network policies -----------------------------------------------


def ingress_rules(policy: dict) -> list[tuple[list[dict], list[dict]]]:
    return [(rule.get("from", []), rule.get("ports", [])) for rule in policy["spec"]["ingress"]]


def pod_labels(deployment: dict) -> dict:
    return deployment["spec"]["template"]["metadata"]["labels"]


def selects(peer: dict, deployment: dict) -> bool:
    wanted = peer["podSelector"]["matchLabels"]
    return wanted.items() <= pod_labels(deployment).items()


@pytest.mark.parametrize("low,high", [(20000, 20999), (21000, 21099)])
def test_tunnel_service_and_its_network_policy(values, low, high):
    manifests = chart.render(with_changes(values, {"tunnels": {"forwardPorts": {
        "low": low, "high": high}}}))
    tunnels = chart.tunnels_deployment(manifests)
    hub, proxy = chart.hub_deployment(manifests), chart.proxy_deployment(manifests)
    assert tunnels["spec"]["strategy"] == {"type": "Recreate"}
    assert tunnels["spec"]["replicas"] == 1
    assert chart.container(tunnels, "tunnels")["image"] == chart.container(hub, "hub")["image"]
    assert chart.tunnels_command(manifests) == [
        "python", "-m", "hub_spawner.tunnels", "--dir", "/srv/tunnels/state",
        "--listen", "0.0.0.0:8765", "--metrics", ":9101", "--forward-ports", f"{low}-{high}"]
    annotations = tunnels["spec"]["template"]["metadata"]["annotations"]
    assert (annotations["prometheus.io/scrape"], annotations["prometheus.io/port"]) == (
        "true", "9101")
    tunnel_mounts = chart.container(tunnels, "tunnels")["volumeMounts"]
    mounts = {m["mountPath"]: m["name"] for m in tunnel_mounts}
    assert mounts["/srv/tunnels"] == "state"
    volumes = {v["name"]: v for v in tunnels["spec"]["template"]["spec"]["volumes"]}
    assert volumes["state"]["persistentVolumeClaim"]["claimName"] == f"{FULLNAME}-tunnels-state"

    service = chart.find(manifests, "Service", f"{FULLNAME}-tunnels")
    assert service["spec"]["clusterIP"] == "None"
    assert service["spec"]["ports"] == [
        {"name": "control", "port": 8765, "targetPort": "control", "protocol": "TCP"}]
    assert selects({"podSelector": {"matchLabels": service["spec"]["selector"]}}, tunnels)

    policy = chart.find(manifests, "NetworkPolicy", f"{FULLNAME}-tunnels")
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    assert selects({"podSelector": policy["spec"]["podSelector"]}, tunnels)
    (control_from, control_ports), (forward_from, forward_ports), metrics = (
        ingress_rules(policy))
    assert metrics == ([], [{"port": 9101, "protocol": "TCP"}])  # counts only: any scraper
    assert len(control_from) == 1 and selects(control_from[0], hub)
    assert not selects(control_from[0], proxy)
    assert control_ports == [{"port": 8765, "protocol": "TCP"}]
    # the proxy (user requests) and the hub (its own requests to each server's URL: the poll
    # of .../api after a spawn, the check of every running server at hub start-up), nobody else
    assert len(forward_from) == 2
    assert selects(forward_from[0], proxy) and not selects(forward_from[0], hub)
    assert selects(forward_from[1], hub) and not selects(forward_from[1], proxy)
    assert not any(selects(peer, tunnels) for peer in forward_from)
    assert forward_ports == [{"port": low, "endPort": high, "protocol": "TCP"}]

    env = chart.hub_env(manifests)
    assert env["HUB_SPAWNER_TUNNEL_ADDRESS"] == f"{service['metadata']['name']}:8765"
    assert env["HUB_SPAWNER_TUNNEL_CONNECT_HOST"] == service["metadata"]["name"]


def test_hub_and_proxy_network_policies(manifests):
    hub, proxy = chart.hub_deployment(manifests), chart.proxy_deployment(manifests)
    tunnels = chart.tunnels_deployment(manifests)

    policy = chart.find(manifests, "NetworkPolicy", f"{FULLNAME}-hub")
    assert selects({"podSelector": policy["spec"]["podSelector"]}, hub)
    [(peers, ports), (check_from, check_ports)] = ingress_rules(policy)
    assert ports == [{"port": 8081, "protocol": "TCP"}]
    assert len(peers) == 2
    assert selects(peers[0], proxy) and selects(peers[1], tunnels)
    # the check's stand-in hub API (python -m hub_spawner check --submit in the hub pod), reached
    # by the tunnel service's reverse forward only
    assert check_ports == [{"port": 8082, "protocol": "TCP"}]
    assert len(check_from) == 1 and selects(check_from[0], tunnels)
    assert not selects(check_from[0], proxy)

    policy = chart.find(manifests, "NetworkPolicy", f"{FULLNAME}-proxy")
    assert selects({"podSelector": policy["spec"]["podSelector"]}, proxy)
    (public_from, public_ports), (api_from, api_ports) = ingress_rules(policy)
    assert public_from == [] and public_ports == [{"port": 8000, "protocol": "TCP"}]
    assert len(api_from) == 1 and selects(api_from[0], hub) and not selects(api_from[0], tunnels)
    assert api_ports == [{"port": 8001, "protocol": "TCP"}]


def test_check_port_and_pod_ip(values):
    """`python -m hub_spawner check --submit` in the hub pod: its stand-in hub API listens on the
    pod IP (HUB_SPAWNER_POD_IP, downward API) and hub.checkPort, which the hub's NetworkPolicy
    opens to the tunnel service (its reverse forward), and to nobody else."""
    defaults = yaml.safe_load((chart.CHART_DIR / "values.yaml").read_text())
    assert defaults["hub"]["checkPort"] == 8082
    manifests = chart.render(values)
    hub = chart.hub_deployment(manifests)
    env = {item["name"]: item for item in chart.container(hub, "hub")["env"]}
    assert env["HUB_SPAWNER_POD_IP"] == {"name": "HUB_SPAWNER_POD_IP", "valueFrom": {
        "fieldRef": {"fieldPath": "status.podIP"}}}
    assert chart.hub_env(manifests)["HUB_SPAWNER_POD_IP"] is None  # known only in the pod

    manifests = chart.render(with_changes(values, {"hub": {"checkPort": 9090}}))
    policy = chart.find(manifests, "NetworkPolicy", f"{FULLNAME}-hub")
    rules = ingress_rules(policy)
    assert [ports for _, ports in rules] == [[{"port": 8081, "protocol": "TCP"}],
                                             [{"port": 9090, "protocol": "TCP"}]]
    [check_peer] = rules[1][0]
    assert selects(check_peer, chart.tunnels_deployment(manifests))
    assert not selects(check_peer, chart.proxy_deployment(manifests))
    # nothing else moves: the hub still serves on 8081
    assert chart.container(chart.hub_deployment(manifests), "hub")["ports"] == [
        {"name": "http", "containerPort": 8081, "protocol": "TCP"}]


def test_network_policies_can_be_left_out(values):
    manifests = chart.render(with_changes(values, {"networkPolicy": {"enabled": False}}))
    assert chart.find_all(manifests, "NetworkPolicy") == []


# --- keys and known_hosts ----------------------------------------------------------------------


def test_keys_and_known_hosts_are_mounted_alike_in_hub_and_tunnels(values, manifests):
    expected = {
        "/etc/hub_spawner/keys": {"name": "keys", "subPath": "keys", "readOnly": True},
        "/etc/hub_spawner/known_hosts": {"name": "known-hosts", "subPath": "known_hosts",
                                         "readOnly": True},
    }
    for deployment, name in ((chart.hub_deployment(manifests), "hub"),
                             (chart.tunnels_deployment(manifests), "tunnels")):
        pod = deployment["spec"]["template"]["spec"]
        assert pod["securityContext"]["fsGroup"] == 1000
        assert pod["securityContext"]["runAsUser"] == 1000
        mounts = {m["mountPath"]: m for m in chart.container(deployment, name)["volumeMounts"]}
        for path, mount in expected.items():
            assert {k: mounts[path].get(k) for k in mount} == mount, (name, path)
        assert "/etc/hub_spawner/keys-staging" not in mounts  # only the keys containers see it
        volumes = {v["name"]: v for v in pod["volumes"]}
        assert volumes["keys"]["emptyDir"]["medium"] == "Memory"
        assert volumes["keys-staging"]["secret"] == {"secretName": "hub-ssh-keys",
                                                     "defaultMode": 0o400}
        assert volumes["known-hosts"]["configMap"]["name"] == f"{FULLNAME}-known-hosts"

        init = chart.container(deployment, "keys-init")
        assert init["securityContext"]["runAsUser"] == 1000
        script = init["args"][0]
        assert 'chmod 0600 "$dst/.$name.tmp"' in script and 'chmod 0700 "$dst"' in script
        init_mounts = {m["mountPath"]: m["name"] for m in init["volumeMounts"]}
        assert init_mounts == {"/etc/hub_spawner/keys-staging": "keys-staging",
                               "/keys-rw": "keys"}
        assert chart.container(deployment, "keys-sync")["volumeMounts"] == init["volumeMounts"]

    known_hosts = chart.find(manifests, "ConfigMap", f"{FULLNAME}-known-hosts")["data"]
    assert known_hosts["known_hosts"] == values["cluster"]["knownHosts"]
    # the key path the hub sends to the tunnel service is the one both pods mount
    assert chart.hub_env(manifests)["HUB_SPAWNER_SSH_KEY_PATH_TEMPLATE"].startswith(
        "/etc/hub_spawner/keys/")


def test_keys_sync_can_be_off(values):
    manifests = chart.render(with_changes(values, {"identity": {"resyncSeconds": 0}}))
    for deployment in (chart.hub_deployment(manifests), chart.tunnels_deployment(manifests)):
        names = [c["name"] for c in deployment["spec"]["template"]["spec"]["containers"]]
        assert "keys-sync" not in names
    default = chart.render(with_changes(values, {"identity": {"keysSecret": None}}))
    volumes = chart.hub_deployment(default)["spec"]["template"]["spec"]["volumes"]
    staging = next(v for v in volumes if v["name"] == "keys-staging")
    assert staging["secret"]["secretName"] == f"{FULLNAME}-ssh-keys"


def run_keys_script(script: str, staging: Path, emptydir: Path) -> None:
    script = script.replace("/etc/hub_spawner/keys-staging", str(staging)).replace(
        "/keys-rw", str(emptydir))
    subprocess.run(["sh", "-c", script], check=True, timeout=30)


def test_keys_copy_script_makes_private_copies(manifests, tmp_path):
    """The initContainer's script, run here on a directory laid out as a Secret volume is
    (files are symlinks into ..data) with group-readable files, as with fsGroup."""
    script = chart.container(chart.tunnels_deployment(manifests), "keys-init")["args"][0]
    staging, emptydir = tmp_path / "staging", tmp_path / "emptydir"
    data = staging / "..2024_01_01"
    data.mkdir(parents=True)
    emptydir.mkdir()
    for user in ("alice", "bob"):
        (data / user).write_text(f"PRIVATE KEY OF {user}\n")
        (data / user).chmod(0o440)
    (staging / "..data").symlink_to(data.name)
    for user in ("alice", "bob"):
        (staging / user).symlink_to(f"..data/{user}")

    run_keys_script(script, staging, emptydir)
    keys = emptydir / "keys"
    assert stat.S_IMODE(keys.stat().st_mode) == 0o700
    assert sorted(p.name for p in keys.iterdir()) == ["alice", "bob"]
    for user in ("alice", "bob"):
        assert not (keys / user).is_symlink()
        assert stat.S_IMODE((keys / user).stat().st_mode) == 0o600
        assert (keys / user).read_text() == f"PRIVATE KEY OF {user}\n"
        assert (keys / user).stat().st_uid == os.getuid()

    # the sidecar's later runs: a removed key goes, a changed one is replaced
    (staging / "bob").unlink()
    (data / "alice").chmod(0o640)
    (data / "alice").write_text("NEW KEY\n")
    run_keys_script(script, staging, emptydir)
    assert sorted(p.name for p in keys.iterdir()) == ["alice"]
    assert (keys / "alice").read_text() == "NEW KEY\n"
    assert stat.S_IMODE((keys / "alice").stat().st_mode) == 0o600


# --- identity modes ----------------------------------------------------------------------------


def key_material(manifests: list[dict], deployment: dict) -> dict:
    """What of a pod has to do with SSH identities: its Secret volumes (other than the hub's
    config), its Memory emptyDirs, the initContainers and sidecars that copy them, and the main
    container's mounts under /etc/hub_spawner other than known_hosts. internal_ssl's
    certificates (hub.internalSsl) are not SSH identities: test_internal_ssl_* checks them."""
    name = deployment["spec"]["template"]["metadata"]["labels"]["component"]
    volumes = {n: v for n, v in chart.pod_volumes(deployment).items()
               if not n.startswith("internal-ssl")}
    return {
        "secrets": sorted(n for n, v in volumes.items() if "secret" in v),
        "memory": sorted(n for n, v in volumes.items()
                         if v.get("emptyDir", {}).get("medium") == "Memory"),
        "init": chart.init_container_names(deployment),
        "sidecars": [c for c in chart.container_names(deployment) if c != name],
        "mounts": sorted(path for path in chart.volume_mounts(deployment, name)
                         if path.startswith("/etc/hub_spawner/")
                         and path not in ("/etc/hub_spawner/known_hosts",
                                          "/etc/hub_spawner/internal-ssl-ca")),
    }


NO_KEY_MATERIAL = {"secrets": [], "memory": [], "init": [], "sidecars": [], "mounts": []}


@pytest.mark.parametrize("mode", MODES)
def test_identity_mode_mounts(values, mode):
    """keys: the keys Secret in the hub and tunnels pods. certificate: the CA key Secret in the
    hub pod only (the tunnel service gets each connection's key over the control API).
    authState: nothing in either pod."""
    manifests = chart.render(with_changes(values, MODES[mode]))
    hub, tunnels = chart.hub_deployment(manifests), chart.tunnels_deployment(manifests)
    keys = {"secrets": ["keys-staging"], "memory": ["keys"], "init": ["keys-init"],
            "sidecars": ["keys-sync"], "mounts": ["/etc/hub_spawner/keys"]}
    expected = {
        "keys": (keys, keys),
        "certificate": ({"secrets": ["ca-staging"], "memory": ["ca"], "init": ["ca-init"],
                         "sidecars": [], "mounts": ["/etc/hub_spawner/ca"]}, NO_KEY_MATERIAL),
        "authState": (NO_KEY_MATERIAL, NO_KEY_MATERIAL),
    }[mode]
    assert (key_material(manifests, hub), key_material(manifests, tunnels)) == expected
    # whatever the mode, both pods check the login node's host keys, and /tmp is writable
    for deployment, name in ((hub, "hub"), (tunnels, "tunnels")):
        mounts = chart.volume_mounts(deployment, name)
        assert mounts["/etc/hub_spawner/known_hosts"]["name"] == "known-hosts"
        assert mounts["/tmp"]["name"] == "tmp"
    # the tunnels pod's spec names no Secret but the chart's own (its control token)
    if mode != "keys":
        secrets = set(re.findall(r"'(?:secretName|name)': '([^']+)'", str(tunnels["spec"])))
        assert "hub-ssh-keys" not in secrets and "hub-ssh-ca" not in secrets
        assert "initContainers" not in tunnels["spec"]["template"]["spec"]
        env = chart.hub_env(manifests)
        assert "HUB_SPAWNER_SSH_KEY_PATH_TEMPLATE" not in env
    if mode == "authState":
        assert "initContainers" not in hub["spec"]["template"]["spec"]


def test_certificate_mode_ca_key_in_the_hub_pod(values):
    manifests = chart.render(with_changes(values, CERTIFICATE))
    hub = chart.hub_deployment(manifests)
    volumes = chart.pod_volumes(hub)
    # only the one key of the Secret, as the file "ca", 0400 in the staging volume
    assert volumes["ca-staging"]["secret"] == {
        "secretName": "hub-ssh-ca", "defaultMode": 0o400,
        "items": [{"key": "ca", "path": "ca"}]}
    assert volumes["ca"]["emptyDir"]["medium"] == "Memory"
    env = chart.hub_env(manifests)
    assert env["HUB_SPAWNER_SSH_CA_KEY_PATH"] == CA_KEY_PATH
    mount = chart.volume_mounts(hub, "hub")[os.path.dirname(CA_KEY_PATH)]
    assert mount == {"name": "ca", "mountPath": "/etc/hub_spawner/ca", "subPath": "ca",
                     "readOnly": True}
    assert "/etc/hub_spawner/ca-staging" not in chart.volume_mounts(hub, "hub")

    init = chart.container(hub, "ca-init")
    assert init["securityContext"]["runAsUser"] == 1000
    assert init["image"] == chart.container(hub, "hub")["image"]
    assert {p: m["name"] for p, m in chart.volume_mounts(hub, "ca-init").items()} == {
        "/etc/hub_spawner/ca-staging": "ca-staging", "/ca-rw": "ca"}
    assert chart.volume_mounts(hub, "ca-init")["/etc/hub_spawner/ca-staging"]["readOnly"]
    # the keys-init mechanism: the same script, other directories
    keys_script = chart.container(chart.hub_deployment(chart.render(values)), "keys-init")[
        "args"][0]
    assert init["args"][0] == keys_script.replace("keys-staging", "ca-staging").replace(
        "/keys-rw/keys", "/ca-rw/ca")

    # another key name in the Secret: still the file "ca"
    other = chart.render(with_changes(values, with_changes(CERTIFICATE, {
        "identity": {"caKeySecret": {"name": "site-ca", "key": "id_ed25519"}}})))
    assert chart.pod_volumes(chart.hub_deployment(other))["ca-staging"]["secret"]["items"] == [
        {"key": "id_ed25519", "path": "ca"}]
    assert chart.pod_volumes(chart.hub_deployment(other))["ca-staging"]["secret"][
        "secretName"] == "site-ca"


def test_ca_init_makes_a_private_copy_the_spawner_accepts(values, tmp_path):
    """The ca-init script, run here on a staging directory laid out as the Secret volume is
    (the item "ca" a symlink into ..data, group-readable as with fsGroup): the copy sits where
    the hub container's mount (subPath) puts it at HUB_SPAWNER_SSH_CA_KEY_PATH, mode 0600 and
    owned by the pod's user, and hub_spawner.identity reads it as a private key."""
    import asyncssh

    from hub_spawner import identity

    manifests = chart.render(with_changes(values, CERTIFICATE))
    hub = chart.hub_deployment(manifests)
    script = chart.container(hub, "ca-init")["args"][0]
    staging, emptydir = tmp_path / "staging", tmp_path / "emptydir"
    data = staging / "..2024_01_01"
    data.mkdir(parents=True)
    emptydir.mkdir()
    ca = asyncssh.generate_private_key("ssh-ed25519")
    (data / "ca").write_bytes(ca.export_private_key())
    (data / "ca").chmod(0o440)
    (staging / "..data").symlink_to(data.name)
    (staging / "ca").symlink_to("..data/ca")

    script = script.replace("/etc/hub_spawner/ca-staging", str(staging)).replace(
        "/ca-rw", str(emptydir))
    subprocess.run(["sh", "-c", script], check=True, timeout=30)

    mount = chart.volume_mounts(hub, "hub")["/etc/hub_spawner/ca"]
    ca_path = Path(chart.hub_env(manifests)["HUB_SPAWNER_SSH_CA_KEY_PATH"])
    copied = emptydir / mount["subPath"] / ca_path.relative_to(mount["mountPath"])
    assert sorted(p.name for p in (emptydir / mount["subPath"]).iterdir()) == ["ca"]
    assert stat.S_IMODE(copied.parent.stat().st_mode) == 0o700
    assert stat.S_IMODE(copied.stat().st_mode) == 0o600
    assert copied.stat().st_uid == os.getuid() and not copied.is_symlink()
    key = identity.read_private_key_file(str(copied), "SSH CA key")
    assert key.public_data == ca.public_data


def test_identity_mode_configuration(values, tmp_path):
    """The rendered jupyterhub_config.py in each mode gives the spawner traits of that mode."""
    from hub_spawner.spawner import SlurmSSHSpawner

    c = chart.load_hub_config(chart.render(values), tmp_path / "keys")
    assert c.SSHBatchSpawner.ssh_key_path_template == "/etc/hub_spawner/keys/{username}"
    for unset in ("ssh_ca_key_path", "ssh_certificate_minutes", "auth_state_ssh_key",
                  "auth_state_ssh_certificate"):
        assert unset not in c.SSHBatchSpawner, unset
    assert "enable_auth_state" not in c.Authenticator

    manifests = chart.render(with_changes(values, CERTIFICATE))
    c = chart.load_hub_config(manifests, tmp_path / "certificate")
    assert c.SSHBatchSpawner.ssh_ca_key_path == CA_KEY_PATH
    assert c.SSHBatchSpawner.ssh_certificate_minutes == 10
    assert "ssh_key_path_template" not in c.SSHBatchSpawner
    assert "auth_state_ssh_key" not in c.SSHBatchSpawner
    assert "enable_auth_state" not in c.Authenticator
    live = SlurmSSHSpawner(config=c)
    assert (live.ssh_ca_key_path, live.ssh_certificate_minutes) == (CA_KEY_PATH, 10)
    # another validity, fractional too (the trait is a Float)
    c = chart.load_hub_config(chart.render(with_changes(values, with_changes(
        CERTIFICATE, {"identity": {"certificateMinutes": 2.5}}))), tmp_path / "minutes")
    assert SlurmSSHSpawner(config=c).ssh_certificate_minutes == 2.5

    manifests = chart.render(with_changes(values, AUTH_STATE))
    c = chart.load_hub_config(manifests, tmp_path / "auth_state")
    assert c.Authenticator.enable_auth_state is True
    assert c.SSHBatchSpawner.auth_state_ssh_key == "ssh_key"
    assert c.SSHBatchSpawner.auth_state_ssh_certificate == "ssh_certificate"
    assert "ssh_ca_key_path" not in c.SSHBatchSpawner
    assert "ssh_key_path_template" not in c.SSHBatchSpawner
    live = SlurmSSHSpawner(config=c)
    assert (live.auth_state_ssh_key, live.auth_state_ssh_certificate) == (
        "ssh_key", "ssh_certificate")
    from jupyterhub.auth import Authenticator

    assert Authenticator(config=c).enable_auth_state is True
    # the certificate's auth_state key is optional
    c = chart.load_hub_config(chart.render(with_changes(values, with_changes(
        AUTH_STATE, {"identity": {"authState": {"certificateName": None}}}))), tmp_path / "nc")
    assert c.SSHBatchSpawner.auth_state_ssh_key == "ssh_key"
    assert "auth_state_ssh_certificate" not in c.SSHBatchSpawner


def test_auth_state_mode_crypt_key(values):
    """JUPYTERHUB_CRYPT_KEY: the generated hub.crypt-key (kept on upgrade like the cookie
    secret), given to the hub in mode authState only, and one JupyterHub accepts."""
    from jupyterhub.crypto import CryptKeeper

    for mode in ("keys", "certificate"):
        manifests = chart.render(with_changes(values, MODES[mode]))
        assert "JUPYTERHUB_CRYPT_KEY" not in chart.hub_env(manifests), mode
    manifests = chart.render(with_changes(values, AUTH_STATE))
    key = chart.secret_data(manifests)["hub.crypt-key"]
    assert chart.hub_env(manifests)["JUPYTERHUB_CRYPT_KEY"] == key
    assert "JUPYTERHUB_CRYPT_KEY" not in chart.tunnels_env(manifests)
    with chart.environment({"JUPYTERHUB_CRYPT_KEY": key}):
        assert CryptKeeper().keys == [bytes.fromhex(key)]

    stored = chart.find(manifests, "Secret", f"{FULLNAME}-secret")
    upgraded = chart.render(with_changes(values, AUTH_STATE), existing=[stored])
    assert chart.hub_env(upgraded)["JUPYTERHUB_CRYPT_KEY"] == key
    # kept while another mode is in use, so switching back loses no auth_state
    other = chart.render(values, existing=[stored])
    assert chart.secret_data(other)["hub.crypt-key"] == key

    # given: a rotation list (the first encrypts, all decrypt)
    rotated = "ab" * 32 + ";" + key
    manifests = chart.render(with_changes(values, with_changes(
        AUTH_STATE, {"hub": {"cryptKey": rotated}})), existing=[stored])
    assert chart.hub_env(manifests)["JUPYTERHUB_CRYPT_KEY"] == rotated
    with chart.environment({"JUPYTERHUB_CRYPT_KEY": rotated}):
        assert CryptKeeper().keys == [bytes.fromhex("ab" * 32), bytes.fromhex(key)]

    # the site's own, via hub.extraEnv: it replaces the chart's (no duplicate variable)
    own = {"name": "JUPYTERHUB_CRYPT_KEY", "valueFrom": {"secretKeyRef": {
        "name": "site-crypt", "key": "key"}}}
    manifests = chart.render(with_changes(values, with_changes(
        AUTH_STATE, {"hub": {"extraEnv": [*values["hub"]["extraEnv"], own]}})))
    env = chart.container(chart.hub_deployment(manifests), "hub")["env"]
    assert [item for item in env if item["name"] == "JUPYTERHUB_CRYPT_KEY"] == [own]
    assert "hub.extraEnv sets it" in chart.notes(with_changes(values, with_changes(
        AUTH_STATE, {"hub": {"extraEnv": [own]}})))


def test_identity_mode_configuration_refuses(values, tmp_path):
    """The config file (also run outside Kubernetes) refuses a mode without what it needs."""
    manifests = chart.render(with_changes(values, CERTIFICATE))
    env = {**chart.hub_env(manifests), "HUB_SPAWNER_SSH_CA_KEY_PATH": None}
    with pytest.raises(ValueError, match="identity.mode is certificate, but "
                                         "HUB_SPAWNER_SSH_CA_KEY_PATH .* is not set"):
        chart.load_hub_config(manifests, tmp_path / "1", env=env)

    manifests = chart.render(with_changes(values, AUTH_STATE))
    env = {**chart.hub_env(manifests), "JUPYTERHUB_CRYPT_KEY": None}
    with pytest.raises(ValueError, match="identity.mode is authState, but JUPYTERHUB_CRYPT_KEY "
                                         "is not set"):
        chart.load_hub_config(manifests, tmp_path / "2", env=env)

    # a CA key path without mode certificate would switch the spawner to certificates unseen
    manifests = chart.render(values)
    env = {**chart.hub_env(manifests), "HUB_SPAWNER_SSH_CA_KEY_PATH": CA_KEY_PATH}
    with pytest.raises(ValueError, match="HUB_SPAWNER_SSH_CA_KEY_PATH is set, but identity.mode "
                                         "is 'keys'"):
        chart.load_hub_config(manifests, tmp_path / "3", env=env)

    # values.json written by hand (outside Kubernetes): the mode and keyName are checked too
    source, chart_values = chart.hub_config_files(manifests)
    for identity, message in (({"mode": "ldap"}, "identity.mode: 'ldap' is not one of keys, "
                                                 "certificate, authState"),
                              ({"mode": "authState", "authState": {}},
                               "identity.authState.keyName is empty")):
        directory = tmp_path / identity["mode"]
        directory.mkdir()
        (directory / "values.json").write_text(json.dumps({**chart_values, "identity": identity}))
        (directory / "jupyterhub_config.py").write_text(source)
        from traitlets.config.loader import PyFileConfigLoader

        with chart.environment({**chart.hub_env(manifests), "JUPYTERHUB_CRYPT_KEY": "ab" * 32}), \
                pytest.raises(ValueError, match=re.escape(message)):
            PyFileConfigLoader("jupyterhub_config.py", path=str(directory)).load_config()


def test_identity_mode_change_restarts_tunnels_only_when_its_pod_changes(values):
    """keys -> certificate changes the tunnels pod (its keys go); certificate -> authState
    leaves it as it is (it holds no key in either), so its connections stay."""
    stored = chart.find(chart.render(values), "Secret", f"{FULLNAME}-secret")
    rendered = {mode: chart.render(with_changes(values, changes), existing=[stored])
                for mode, changes in MODES.items()}
    assert (chart.tunnels_deployment(rendered["keys"])
            != chart.tunnels_deployment(rendered["certificate"]))
    assert (chart.tunnels_deployment(rendered["certificate"])
            == chart.tunnels_deployment(rendered["authState"]))
    assert (chart.hub_deployment(rendered["certificate"])
            != chart.hub_deployment(rendered["authState"]))


def test_notes_per_identity_mode(values):
    text = chart.notes(with_changes(values, CERTIFICATE))
    assert "kubectl -n jhub create secret generic hub-ssh-ca" in text
    assert "--from-file=ca=./hub_ca" in text
    assert "TrustedUserCAKeys /etc/ssh/hub_ca.pub" in text
    assert "hub-ssh-keys" not in text and "authorized_keys" not in text
    text = chart.notes(with_changes(values, AUTH_STATE))
    assert 'auth_state["ssh_key"]' in text and 'auth_state["ssh_certificate"]' in text
    assert f"hub.crypt-key of the Secret {FULLNAME}-secret" in text
    assert "hub-ssh-keys" not in text and "hub-ssh-ca" not in text


# --- hub and proxy Deployments and Services ----------------------------------------------------


def test_hub_deployment(manifests):
    hub = chart.hub_deployment(manifests)
    assert hub["spec"]["replicas"] == 1 and hub["spec"]["strategy"] == {"type": "Recreate"}
    assert chart.hub_command(manifests) == [
        "jupyterhub", "-f", "/usr/local/etc/jupyterhub/jupyterhub_config.py"]
    container = chart.container(hub, "hub")
    assert container["image"] == "ghcr.io/hub-spawner/hub-spawner:0.1.0"
    security = container["securityContext"]
    assert security["runAsNonRoot"] and security["runAsUser"] == 1000
    assert security["readOnlyRootFilesystem"] and not security["allowPrivilegeEscalation"]
    for probe in ("livenessProbe", "readinessProbe"):  # internal_ssl: no client certificate
        assert container[probe]["tcpSocket"] == {"port": "http"}, container[probe]
    assert container["ports"] == [{"name": "http", "containerPort": 8081, "protocol": "TCP"}]
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    assert mounts["/usr/local/etc/jupyterhub"] == {
        "name": "config", "mountPath": "/usr/local/etc/jupyterhub", "readOnly": True}
    assert mounts["/srv/jupyterhub"]["name"] == "hub-data"
    assert mounts["/tmp"]["name"] == "tmp"
    volumes = {v["name"]: v for v in hub["spec"]["template"]["spec"]["volumes"]}
    # jupyterhub_config.py from the ConfigMap, values.json (it may hold secrets) from a Secret,
    # in one directory: the config file reads values.json from its own directory
    assert volumes["config"]["projected"]["sources"] == [
        {"configMap": {"name": f"{FULLNAME}-hub", "items": [
            {"key": "jupyterhub_config.py", "path": "jupyterhub_config.py"}]}},
        {"secret": {"name": f"{FULLNAME}-hub-values", "items": [
            {"key": "values.json", "path": "values.json", "mode": 0o440}]}},
    ]
    assert volumes["hub-data"]["persistentVolumeClaim"]["claimName"] == f"{FULLNAME}-hub-db"
    assert hub["spec"]["template"]["spec"]["automountServiceAccountToken"] is False

    pvc = chart.find(manifests, "PersistentVolumeClaim", f"{FULLNAME}-hub-db")
    assert pvc["spec"]["resources"]["requests"]["storage"] == "1Gi"
    assert "storageClassName" not in pvc["spec"]
    service = chart.find(manifests, "Service", f"{FULLNAME}-hub")
    assert service["spec"]["ports"] == [
        {"name": "hub", "port": 8081, "targetPort": "http", "protocol": "TCP"}]
    assert selects({"podSelector": {"matchLabels": service["spec"]["selector"]}}, hub)

    env = chart.hub_env(manifests)
    assert env["HUB_SPAWNER_HUB_CONNECT_IP"] == service["metadata"]["name"]
    assert env["HUB_SPAWNER_HUB_BIND_URL"] == "https://:8081"
    assert env["OAUTH_CLIENT_SECRET"] is None  # hub.extraEnv, from the user's own Secret


@pytest.mark.parametrize("changes", [
    {"hub": {"config": {"JupyterHub": {"admin_users": ["alice", "bob"]}}}},
    {"hub": {"config": {"GitHubOAuthenticator": {"client_secret": "rotated"}}}},
    {"hub": {"extraConfig": {"10-limit": "c.JupyterHub.concurrent_spawn_limit = 5"}}},
    {"spawner": {"maxCpus": 32}},
], ids=["hub.config", "client secret", "hub.extraConfig", "spawner"])
def test_hub_restarts_for_config_alone(values, changes):
    """A change of values.json (now in the Secret <fullname>-hub-values, not the ConfigMap)
    restarts the hub, but neither the proxy nor the tunnel service."""
    stored = stored_secrets(chart.render(values))
    before = chart.render(values, existing=stored)
    after = chart.render(with_changes(values, changes), existing=stored)
    # what changed is values.json alone: the ConfigMap stays, the hub-values Secret does not
    assert (chart.find(before, "ConfigMap", f"{FULLNAME}-hub")
            == chart.find(after, "ConfigMap", f"{FULLNAME}-hub"))
    assert (chart.secret_data(before, f"{FULLNAME}-hub-values")
            != chart.secret_data(after, f"{FULLNAME}-hub-values"))

    def annotations(manifests, deployment):
        return deployment(manifests)["spec"]["template"]["metadata"]["annotations"]

    assert annotations(before, chart.hub_deployment) != annotations(after, chart.hub_deployment)
    for deployment in (chart.proxy_deployment, chart.tunnels_deployment):
        assert annotations(before, deployment) == annotations(after, deployment)
        assert deployment(before) == deployment(after)
        # nor would a new chart version alone: the pod templates do not name it
        labels = pod_labels(deployment(before))
        assert "helm.sh/chart" not in labels and "app.kubernetes.io/version" not in labels


def test_pvc_storage_class(values):
    manifests = chart.render(with_changes(values, VARIANT))
    pvc = chart.find(manifests, "PersistentVolumeClaim", f"{FULLNAME}-tunnels-state")
    assert pvc["spec"]["storageClassName"] == "ssd"
    assert pvc["spec"]["accessModes"] == ["ReadWriteOnce"]


def test_proxy(manifests):
    proxy = chart.proxy_deployment(manifests)
    assert proxy["spec"]["replicas"] == 1 and proxy["spec"]["strategy"] == {"type": "Recreate"}
    chp = chart.container(proxy, "chp")
    assert chp["image"].startswith("quay.io/jupyterhub/configurable-http-proxy:")
    assert chart.command_line(proxy, "chp") == [
        "configurable-http-proxy", "--ip=", "--api-ip=", "--port=8000", "--api-port=8001",
        f"--default-target=https://{FULLNAME}-hub:8081",
        f"--error-target=https://{FULLNAME}-hub:8081/hub/error",
        "--api-ssl-key=/etc/chp/tls/proxy-api.key", "--api-ssl-cert=/etc/chp/tls/proxy-api.crt",
        "--api-ssl-ca=/etc/chp/tls/proxy-api-ca_trust.crt", "--api-ssl-request-cert",
        "--api-ssl-reject-unauthorized",
        "--client-ssl-key=/etc/chp/tls/proxy-client.key",
        "--client-ssl-cert=/etc/chp/tls/proxy-client.crt",
        "--client-ssl-ca=/etc/chp/tls/proxy-client-ca_trust.crt", "--client-ssl-request-cert",
        "--client-ssl-reject-unauthorized",
    ]
    assert chp["env"] == [{"name": "CONFIGPROXY_AUTH_TOKEN", "valueFrom": {"secretKeyRef": {
        "name": f"{FULLNAME}-secret", "key": "proxy.auth-token"}}}]
    public = chart.find(manifests, "Service", f"{FULLNAME}-proxy-public")
    assert public["spec"]["type"] == "ClusterIP"  # as z2jh's ingress setups: no open door
    assert public["spec"]["ports"] == [
        {"name": "http", "port": 80, "targetPort": "http", "protocol": "TCP"}]
    assert {"name": "http", "containerPort": 8000, "protocol": "TCP"} in chp["ports"]
    api = chart.find(manifests, "Service", f"{FULLNAME}-proxy-api")
    assert api["spec"]["type"] == "ClusterIP"
    assert api["spec"]["ports"] == [
        {"name": "api", "port": 8001, "targetPort": "api", "protocol": "TCP"}]
    for service in (public, api):
        assert selects({"podSelector": {"matchLabels": service["spec"]["selector"]}}, proxy)


def stored_secrets(manifests: list[dict]) -> list[dict]:
    """The Secrets an installed release keeps (what ``lookup`` finds on an upgrade)."""
    return [chart.find(manifests, "Secret", f"{FULLNAME}-secret"),
            chart.find(manifests, "Secret", f"{FULLNAME}-internal-ssl")]


def test_internal_ssl_certificates_chain_as_jupyterhub_lays_trust_out(manifests, tmp_path):
    """The generated authorities, the proxy's certificates and its trust bundles, checked with
    OpenSSL: the proxy's API certificate names its Service, each certificate is signed by its
    authority, and each bundle holds exactly the authorities JupyterHub's init_internal_ssl
    gives that component."""
    files = chart.secret_data(manifests, f"{FULLNAME}-internal-ssl")
    for name, text in files.items():
        (tmp_path / name).write_text(text)
        if name.endswith(".key"):
            assert "PRIVATE KEY" in text, name

    def verify(ca: str, cert: str) -> subprocess.CompletedProcess:
        return subprocess.run(["openssl", "verify", "-CAfile", str(tmp_path / ca),
                               str(tmp_path / cert)], capture_output=True, text=True)

    for cert, ca in (("proxy-api.crt", "proxy-api-ca.crt"),
                     ("proxy-client.crt", "proxy-client-ca.crt"),
                     ("proxy-api.crt", "proxy-api-ca_trust.crt")):
        assert verify(ca, cert).returncode == 0, (cert, ca, verify(ca, cert).stderr)
    assert verify("hub-ca.crt", "proxy-api.crt").returncode != 0  # a wrong authority fails
    names = subprocess.run(["openssl", "x509", "-noout", "-ext", "subjectAltName", "-in",
                            str(tmp_path / "proxy-api.crt")], capture_output=True, text=True,
                           check=True).stdout
    assert f"DNS:{FULLNAME}-proxy-api" in names and "IP Address:127.0.0.1" in names

    def bundle(name: str) -> list[str]:
        text = files[name]
        return [block for block in text.split("-----END CERTIFICATE-----") if block.strip()]

    cas = {name: files[f"{name}.crt"].split("-----END CERTIFICATE-----")[0]
           for name in ("hub-ca", "notebooks-ca", "proxy-api-ca", "proxy-client-ca",
                        "services-ca")}

    def holds(name: str) -> set[str]:
        return {ca for ca, pem in cas.items() for block in bundle(name)
                if block.strip() == pem.strip()}

    assert holds("proxy-api-ca_trust.crt") == {"proxy-api-ca", "hub-ca", "services-ca",
                                               "notebooks-ca"}
    assert holds("proxy-client-ca_trust.crt") == {"proxy-client-ca", "hub-ca", "notebooks-ca"}


def test_internal_ssl_mounts_and_off_switch(values):
    """The hub gets the authorities (keys and certificates, group-readable, memory volume for
    what it makes), the proxy only its own certificates; with hub.internalSsl.enabled false
    nothing of it is rendered and everything is plain HTTP, as before."""
    manifests = chart.render(values)
    hub, proxy = chart.hub_deployment(manifests), chart.proxy_deployment(manifests)
    secret = f"{FULLNAME}-internal-ssl"
    hub_items = chart.pod_volumes(hub)["internal-ssl-ca"]["secret"]
    assert hub_items["secretName"] == secret
    assert sorted(item["key"] for item in hub_items["items"]) == sorted(
        f"{name}.{ext}" for name in ("hub-ca", "notebooks-ca", "proxy-api-ca",
                                     "proxy-client-ca", "services-ca") for ext in ("crt", "key"))
    assert {item["mode"] for item in hub_items["items"]} == {0o440}
    assert chart.pod_volumes(hub)["internal-ssl"]["emptyDir"]["medium"] == "Memory"
    proxy_items = chart.pod_volumes(proxy)["tls"]["secret"]
    assert sorted(item["key"] for item in proxy_items["items"]) == [
        "proxy-api-ca_trust.crt", "proxy-api.crt", "proxy-api.key", "proxy-client-ca_trust.crt",
        "proxy-client.crt", "proxy-client.key"]  # no authority's key
    assert proxy["spec"]["template"]["spec"]["securityContext"]["fsGroup"] == 65534
    assert chart.volume_mounts(proxy, "chp")["/etc/chp/tls"]["readOnly"] is True

    plain = chart.render(with_changes(values, {"hub": {"internalSsl": {"enabled": False}}}))
    assert not [m for m in plain if m["metadata"]["name"] == secret]
    assert "--api-ssl-key=/etc/chp/tls/proxy-api.key" not in chart.command_line(
        chart.proxy_deployment(plain), "chp")
    env = chart.hub_env(plain)
    assert env["HUB_SPAWNER_PROXY_API_URL"].startswith("http://")
    assert "HUB_SPAWNER_INTERNAL_SSL_CA_DIR" not in env
    assert "internal-ssl" not in chart.pod_volumes(chart.hub_deployment(plain))


def test_proxy_service_type_from_values(values):
    manifests = chart.render(with_changes(values, VARIANT))
    public = chart.find(manifests, "Service", f"{FULLNAME}-proxy-public")
    assert public["spec"]["type"] == "NodePort"
    assert public["spec"]["ports"][0]["nodePort"] == 30080


def test_notes(values):
    text = chart.notes(values)
    assert "kubectl -n jhub create secret generic hub-ssh-keys" in text
    assert "GatewayPorts clientspecified" in text
    assert f"service/{FULLNAME}-proxy-public" in text


# --- the users' way in: ingress, https ---------------------------------------------------------


def test_an_ingress_leads_to_the_proxys_public_service(values):
    manifests = chart.render(with_changes(values, {"ingress": {
        "enabled": True, "ingressClassName": "nginx", "hosts": ["jupyter.example.org"],
        "annotations": {"cert-manager.io/cluster-issuer": "letsencrypt"},
        "tls": [{"hosts": ["jupyter.example.org"], "secretName": "jupyter-tls"}]}}))
    ingress = chart.find(manifests, "Ingress", FULLNAME)
    assert ingress["metadata"]["annotations"] == {"cert-manager.io/cluster-issuer": "letsencrypt"}
    assert ingress["spec"]["ingressClassName"] == "nginx"
    assert ingress["spec"]["tls"] == [{"hosts": ["jupyter.example.org"],
                                       "secretName": "jupyter-tls"}]
    [rule] = ingress["spec"]["rules"]
    assert rule["host"] == "jupyter.example.org"
    assert rule["http"]["paths"] == [{"path": "/", "pathType": "Prefix", "backend": {
        "service": {"name": f"{FULLNAME}-proxy-public", "port": {"name": "http"}}}}]
    assert chart.find(manifests, "Service", f"{FULLNAME}-proxy-public")["spec"]["type"] == (
        "ClusterIP")
    assert "https://jupyter.example.org/" in chart.notes(with_changes(values, {"ingress": {
        "enabled": True, "hosts": ["jupyter.example.org"], "tls": [{"secretName": "x"}]}}))
    assert not [m for m in chart.render(values) if m["kind"] == "Ingress"]  # off by default


def test_https_with_a_secret_makes_the_proxy_serve_tls_on_the_https_port_only(values):
    manifests = chart.render(with_changes(values, {"proxy": {
        "service": {"type": "LoadBalancer"},
        "https": {"enabled": True, "type": "secret", "secret": {"name": "jupyter-tls"}}}}))
    proxy = chart.proxy_deployment(manifests)
    chp = chart.container(proxy, "chp")
    assert "--ssl-key=/etc/chp/https/tls.key" in chp["command"]
    assert "--ssl-cert=/etc/chp/https/tls.crt" in chp["command"]
    assert chart.volume_mounts(proxy, "chp")["/etc/chp/https"]["name"] == "https"
    assert chart.pod_volumes(proxy)["https"]["secret"]["secretName"] == "jupyter-tls"
    for probe in ("livenessProbe", "readinessProbe"):
        assert chp[probe]["httpGet"]["scheme"] == "HTTPS"
    public = chart.find(manifests, "Service", f"{FULLNAME}-proxy-public")
    assert public["spec"]["ports"] == [
        {"name": "https", "port": 443, "targetPort": "http", "protocol": "TCP"}]


def test_https_offloaded_to_a_load_balancer_adds_an_https_port_to_the_plain_proxy(values):
    manifests = chart.render(with_changes(values, {"proxy": {
        "service": {"type": "LoadBalancer"}, "https": {"enabled": True, "type": "offload"}}}))
    chp = chart.container(chart.proxy_deployment(manifests), "chp")
    assert not any(arg.startswith("--ssl-") for arg in chp["command"])
    public = chart.find(manifests, "Service", f"{FULLNAME}-proxy-public")
    assert [port["name"] for port in public["spec"]["ports"]] == ["http", "https"]


def test_https_with_a_secret_needs_its_name(values):
    with pytest.raises(chart.sdk().HelmValuesError, match="/proxy/https/secret"):
        chart.render(with_changes(values, {"proxy": {"https": {"enabled": True}}}))


# --- the image and the docs agree with the chart -----------------------------------------------


def test_image_and_versions_agree():
    chart_meta = yaml.safe_load((chart.CHART_DIR / "Chart.yaml").read_text())
    defaults = yaml.safe_load((chart.CHART_DIR / "values.yaml").read_text())
    pyproject = (chart.REPO / "pyproject.toml").read_text()
    version = re.search(r'^version = "([^"]+)"', pyproject, re.M).group(1)
    assert chart_meta["appVersion"] == defaults["hub"]["image"]["tag"] == version

    dockerfile = (chart.REPO / "Dockerfile").read_text()
    assert re.search(r"^ARG BASE=python:3\.11-slim$", dockerfile, re.M)
    assert re.search(r"^FROM \$\{BASE\}$", dockerfile, re.M)
    assert "openssh-client" in dockerfile
    assert re.search(r"^USER 1000", dockerfile, re.M)
    assert re.search(r"^WORKDIR /srv/jupyterhub$", dockerfile, re.M)
    tested = (chart.REPO / "tests" / "lab" / "requirements.txt").read_text()
    for package in ("jupyterhub", "jupyterhub-idle-culler", "oauthenticator", "asyncssh",
                    "traitlets"):
        pin = re.search(rf"^{package}==(\S+)$", tested, re.M).group(0)
        assert re.search(rf"^\s+{re.escape(pin)} \\$", dockerfile, re.M), pin


def test_readme_shows_the_tested_values_file():
    readme = (chart.REPO / "README.md").read_text()
    fixture = chart.SLURM_VALUES.read_text()
    assert f"```yaml\n{fixture}```" in readme


def test_readme_shows_the_certificate_mode():
    section = helm_section((chart.REPO / "README.md").read_text())
    assert f"```yaml\n{chart.CERTIFICATE_VALUES.read_text()}```" in section
    assert "kubectl create secret generic hub-ssh-ca --from-file=ca=./hub_ca" in section
    assert "kubectl -n jhub create secret generic hub-ssh-ca --from-file=ca=./hub_ca" in section
    assert "TrustedUserCAKeys /etc/ssh/hub_ca.pub" in section
    assert "-f values-slurm.yaml -f values-certificate.yaml" in section


def helm_section(readme: str) -> str:
    return readme.split("## Install with Helm", 1)[1].split("\n## ", 1)[0]


def test_readme_check_command_matches_the_chart(manifests):
    """The README's check command: the chart's Deployment name, config path and check port, and
    $HUB_SPAWNER_POD_IP expanded by the pod's shell (sh -c '...'), not the local one."""
    import shlex

    section = helm_section((chart.REPO / "README.md").read_text())
    command = next(block for block in re.findall(r"```sh\n(.*?)```", section, re.S)
                   if "hub_spawner check" in block)
    argv = shlex.split(command.replace("\\\n", " "))
    assert argv[:8] == ["kubectl", "-n", chart.NAMESPACE, "exec", "deploy/<fullname>-hub", "--",
                        "sh", "-c"], argv
    assert len(argv) == 9
    assert argv[4].replace("<fullname>", chart.fullname(manifests)) == (
        f"deploy/{chart.hub_deployment(manifests)['metadata']['name']}")
    assert "$HUB_SPAWNER_POD_IP" in command.split("'")[1]  # inside the single quotes
    defaults = yaml.safe_load((chart.CHART_DIR / "values.yaml").read_text())
    # run the pod's side with a stand-in python: what the check's command line would be
    script = 'python() { printf "%s\\n" "$@"; }\n' + argv[8]
    result = subprocess.run(["sh", "-c", script], capture_output=True, text=True, timeout=30,
                            env={"PATH": os.environ["PATH"], "HUB_SPAWNER_POD_IP": "10.1.2.3"},
                            check=True)
    assert result.stdout.splitlines() == [
        "-m", "hub_spawner", "check", "-f", chart.hub_command(manifests)[-1], "--user", "alice",
        "--submit", "--hub-ip", "10.1.2.3", "--hub-port", str(defaults["hub"]["checkPort"])]
    # and that config path is the projected config directory's jupyterhub_config.py
    config = Path(chart.hub_command(manifests)[-1])
    assert str(config.parent) == chart.HUB_CONFIG_DIR and config.name in chart.mounted_files(
        manifests, chart.hub_deployment(manifests), "hub", chart.HUB_CONFIG_DIR)


def test_readme_network_policies_and_values_secret():
    section = " ".join(helm_section((chart.REPO / "README.md").read_text()).split())
    assert ("its forward ports from the proxy and the hub" in section)
    assert "the hub's `hub.checkPort` (8082) from the tunnel service" in section
    assert "They land in a ConfigMap" not in section
    assert "They land in the Secret `<fullname>-hub-values`" in section


def test_tunnel_state_dir_and_its_unix_sockets(manifests):
    """The service's --dir holds forwards.json and also its Unix sockets (ctl, m/*) and its lock,
    all on the PVC: nothing is mounted inside it (a mount cannot split them: ctl sits in --dir
    itself and forwards.json is replaced by rename), so the PVC's StorageClass must support
    Unix sockets, and values.yaml, the PVC template and the README say so."""
    tunnels = chart.tunnels_deployment(manifests)
    command = chart.tunnels_command(manifests)
    state = command[command.index("--dir") + 1]
    mounts = chart.container(tunnels, "tunnels")["volumeMounts"]
    [pvc_mount] = [m for m in mounts if state.startswith(m["mountPath"] + "/")]
    assert pvc_mount["name"] == "state" and not pvc_mount.get("subPath")
    assert not [m for m in mounts if m["mountPath"].startswith(state)]
    volumes = {v["name"]: v for v in tunnels["spec"]["template"]["spec"]["volumes"]}
    assert volumes["state"]["persistentVolumeClaim"]["claimName"] == f"{FULLNAME}-tunnels-state"

    values_yaml = (chart.CHART_DIR / "values.yaml").read_text()
    tunnels_block = values_yaml.split("\ntunnels:\n", 1)[1].split("\n  pvc:", 1)[0]
    template = (chart.CHART_DIR / "templates" / "tunnels" / "pvc.yaml").read_text()
    readme = " ".join(helm_section((chart.REPO / "README.md").read_text()).split())
    for text in (" ".join(tunnels_block.replace("#", " ").split()), " ".join(template.split())):
        assert "must support Unix sockets" in text, text
        assert "ctl" in text and "m/" in text
    assert "its StorageClass must support them" in readme
    assert "Unix sockets" in readme
