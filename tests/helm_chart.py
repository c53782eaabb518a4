"""Render the Helm chart (helm/hub-spawner) offline and take the rendered objects apart.

Uses helm-python-sdk (``helm_python``: Helm's Go SDK v4 behind a C ABI; no helm binary, no
cluster). Rendering validates the values against the chart's values.schema.json first, as
``helm install`` does, so a bad value raises ``helm_python.HelmValuesError`` naming the key.

Typical use, e.g. to run the rendered hub configuration against a real lab::

    from tests import helm_chart

    manifests = helm_chart.render(helm_chart.load_values(helm_chart.SLURM_VALUES))
    config_path = helm_chart.write_hub_config(manifests, "/tmp/hub")  # + values.json beside it
    env = helm_chart.hub_env(manifests)      # what the hub Deployment sets, secrets resolved
    argv = helm_chart.tunnels_command(manifests)

``env`` then needs the addresses changed for the lab (HUB_SPAWNER_TUNNEL_ADDRESS, ...): the
configuration reads every address and secret from the environment (see
helm/hub-spawner/files/jupyterhub_config.py).
"""

from __future__ import annotations

import base64
import contextlib
import copy
import json
import os
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parent.parent
CHART_DIR = REPO / "helm" / "hub-spawner"
SLURM_VALUES = REPO / "tests" / "fixtures" / "helm" / "values-slurm.yaml"
#: An overlay for SLURM_VALUES: identity.mode certificate (helm ... -f values-slurm.yaml -f this).
CERTIFICATE_VALUES = REPO / "tests" / "fixtures" / "helm" / "values-certificate.yaml"
RELEASE = "hub"
NAMESPACE = "jhub"

Manifest = dict[str, Any]


def sdk():
    """helm-python-sdk's module, imported on first use (never at collection time)."""
    try:
        import helm_python
    except ImportError as error:  # pragma: no cover - the test suite's venv has it
        raise RuntimeError(
            "helm-python-sdk is not installed: pip install -r tests/lab/requirements.txt "
            f"({error})"
        ) from None
    return helm_python


def load_values(*paths: str | os.PathLike[str]) -> dict[str, Any]:
    """Values files as one dict (default: SLURM_VALUES), each merged over the ones before it as
    ``helm -f first -f second`` does: mappings key by key, anything else replaced, and a null
    deleting the key."""
    values: dict[str, Any] = {}
    for path in paths or (SLURM_VALUES,):
        values = merge_values(values, yaml.safe_load(Path(path).read_text()) or {})
    return values


def merge_values(base: dict[str, Any], overlay: dict[str, Any]) -> dict[str, Any]:
    """``overlay`` merged over ``base`` (neither is changed), as Helm merges values files."""
    result = copy.deepcopy(base)
    for key, value in overlay.items():
        if value is None:
            result.pop(key, None)
        elif isinstance(value, dict) and isinstance(result.get(key), dict):
            result[key] = merge_values(result[key], value)
        else:
            result[key] = copy.deepcopy(value)
    return result


# --- rendering ---------------------------------------------------------------------------------


def render_templates(
    values: dict[str, Any],
    *,
    release: str = RELEASE,
    namespace: str = NAMESPACE,
    existing: list[Manifest] | None = None,
) -> dict[str, str]:
    """Rendered templates as ``{template path: YAML text}`` (NOTES.txt included).

    ``existing``: objects (e.g. the Secret of an earlier render) that the chart's ``lookup``
    finds, as on a ``helm upgrade``; served by a local stand-in for the Kubernetes API (see
    ``fake_api``). Without it, ``lookup`` finds nothing, as on a first install.
    """
    helm = sdk()
    with helm.Chart.load(CHART_DIR) as chart:
        if existing is None:
            return chart.render(values, name=release, namespace=namespace, is_install=True)
        with fake_api(existing) as url, helm.Config(
            kubeconfig_content=_kubeconfig(url, namespace), namespace=namespace
        ) as cfg:
            return cfg.render(chart, values, name=release, namespace=namespace, is_upgrade=True)


def _kubeconfig(url: str, namespace: str) -> str:
    """A kubeconfig naming only ``url``: whatever ~/.kube/config or KUBECONFIG hold (real
    clusters, their credentials) stays out of it."""
    return json.dumps({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "fake", "cluster": {"server": url}}],
        "users": [{"name": "fake", "user": {}}],
        "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "fake",
                                                   "namespace": namespace}}],
        "current-context": "fake",
    })


def render(
    values: dict[str, Any],
    *,
    release: str = RELEASE,
    namespace: str = NAMESPACE,
    existing: list[Manifest] | None = None,
) -> list[Manifest]:
    """The rendered Kubernetes objects as dicts, in template path order."""
    manifests = []
    for path, text in sorted(render_templates(values, release=release, namespace=namespace,
                                              existing=existing).items()):
        if path.endswith("NOTES.txt"):
            continue
        manifests.extend(doc for doc in yaml.safe_load_all(text) if doc)
    return manifests


def render_yaml(values: dict[str, Any], **kwargs: Any) -> str:
    """All rendered objects as one multi-document YAML stream, as ``helm template`` prints it."""
    parts = []
    for path, text in sorted(render_templates(values, **kwargs).items()):
        if path.endswith("NOTES.txt") or not text.strip():
            continue
        for document in text.split("\n---\n"):
            if document.strip():
                parts.append(f"---\n# Source: {path}\n{document.strip()}\n")
    return "".join(parts)


def notes(values: dict[str, Any], **kwargs: Any) -> str:
    """The rendered NOTES.txt."""
    templates = render_templates(values, **kwargs)
    return next(text for path, text in templates.items() if path.endswith("NOTES.txt"))


def lint(values: dict[str, Any], *, kube_version: str | None = None) -> dict[str, Any]:
    """``helm lint --strict`` with ``values``: ``{"messages": [...], "errors": [...]}``."""
    return sdk().lint(CHART_DIR, values, strict=True, namespace=NAMESPACE,
                        kube_version=kube_version)


def validate_schema(values: dict[str, Any]) -> None:
    """Check ``values`` against values.schema.json; raises ``HelmValuesError``."""
    helm = sdk()
    with helm.Chart.load(CHART_DIR) as chart:
        chart.validate_schema(values)


# --- finding things ----------------------------------------------------------------------------


def find(manifests: list[Manifest], kind: str, name: str) -> Manifest:
    """The object of ``kind`` named ``name``; KeyError lists what there is."""
    for manifest in manifests:
        if manifest.get("kind") == kind and manifest["metadata"]["name"] == name:
            return manifest
    there = sorted(f"{m.get('kind')}/{m['metadata']['name']}" for m in manifests)
    raise KeyError(f"no {kind}/{name} among {there}")


def find_all(manifests: list[Manifest], kind: str) -> list[Manifest]:
    return [m for m in manifests if m.get("kind") == kind]


def by_component(manifests: list[Manifest], kind: str, component: str) -> Manifest:
    """The one object of ``kind`` labelled ``component: <component>`` (hub, proxy, tunnels)."""
    found = [m for m in find_all(manifests, kind)
             if m["metadata"].get("labels", {}).get("component") == component]
    if len(found) != 1:
        raise KeyError(f"{len(found)} {kind} objects with component={component}, wanted one")
    return found[0]


def fullname(manifests: list[Manifest]) -> str:
    """The release's name prefix (``<fullname>-hub`` is the hub Deployment)."""
    return by_component(manifests, "Deployment", "hub")["metadata"]["name"].removesuffix("-hub")


def container(deployment: Manifest, name: str) -> dict[str, Any]:
    """A container (or initContainer) of a Deployment by name."""
    spec = deployment["spec"]["template"]["spec"]
    for item in spec.get("containers", []) + spec.get("initContainers", []):
        if item["name"] == name:
            return item
    raise KeyError(f"no container {name!r} in Deployment {deployment['metadata']['name']}")


def pod_volumes(deployment: Manifest) -> dict[str, dict[str, Any]]:
    """A Deployment's pod volumes by name."""
    return {v["name"]: v for v in deployment["spec"]["template"]["spec"].get("volumes", [])}


def volume_mounts(deployment: Manifest, name: str) -> dict[str, dict[str, Any]]:
    """A container's (or initContainer's) volumeMounts by mount path."""
    return {m["mountPath"]: m for m in container(deployment, name).get("volumeMounts", [])}


def init_container_names(deployment: Manifest) -> list[str]:
    return [c["name"] for c in deployment["spec"]["template"]["spec"].get("initContainers", [])]


def container_names(deployment: Manifest) -> list[str]:
    return [c["name"] for c in deployment["spec"]["template"]["spec"]["containers"]]


def hub_deployment(manifests: list[Manifest]) -> Manifest:
    return by_component(manifests, "Deployment", "hub")


def tunnels_deployment(manifests: list[Manifest]) -> Manifest:
    return by_component(manifests, "Deployment", "tunnels")


def proxy_deployment(manifests: list[Manifest]) -> Manifest:
    return by_component(manifests, "Deployment", "proxy")


# --- secrets, environment, command lines -------------------------------------------------------


def secret_data(manifests: list[Manifest], name: str | None = None) -> dict[str, str]:
    """A rendered Secret's data, decoded (default: the chart's ``<fullname>-secret``)."""
    secret = find(manifests, "Secret", name or f"{fullname(manifests)}-secret")
    data = {key: base64.b64decode(value).decode() for key, value in secret.get("data", {}).items()}
    data.update(secret.get("stringData", {}))
    return data


def container_env(manifests: list[Manifest], deployment: Manifest,
                  name: str) -> dict[str, str | None]:
    """A container's environment as it would be in the pod: plain values, and ``secretKeyRef``
    / ``configMapKeyRef`` resolved against the rendered objects. A reference to an object the
    chart does not render (a user's own Secret, e.g. via hub.extraEnv) gives None, and so does
    the downward API (``fieldRef``, e.g. HUB_SPAWNER_POD_IP: known only in a running pod)."""
    env: dict[str, str | None] = {}
    for item in container(deployment, name).get("env", []):
        if "value" in item:
            env[item["name"]] = str(item["value"])
            continue
        source = item.get("valueFrom", {})
        value = None
        with contextlib.suppress(KeyError):
            if "secretKeyRef" in source:
                ref = source["secretKeyRef"]
                value = secret_data(manifests, ref["name"])[ref["key"]]
            elif "configMapKeyRef" in source:
                ref = source["configMapKeyRef"]
                value = find(manifests, "ConfigMap", ref["name"])["data"][ref["key"]]
        env[item["name"]] = value
    return env


def hub_env(manifests: list[Manifest]) -> dict[str, str | None]:
    """The hub container's environment (see ``container_env``)."""
    return container_env(manifests, hub_deployment(manifests), "hub")


def tunnels_env(manifests: list[Manifest]) -> dict[str, str | None]:
    """The tunnel service container's environment (see ``container_env``)."""
    return container_env(manifests, tunnels_deployment(manifests), "tunnels")


def command_line(deployment: Manifest, name: str) -> list[str]:
    """A container's ``command`` + ``args`` (without the image's entrypoint, tini)."""
    item = container(deployment, name)
    return [str(part) for part in item.get("command", []) + item.get("args", [])]


def tunnels_command(manifests: list[Manifest]) -> list[str]:
    """``["python", "-m", "hub_spawner.tunnels", "--dir", ..., "--forward-ports", ...]``."""
    return command_line(tunnels_deployment(manifests), "tunnels")


def hub_command(manifests: list[Manifest]) -> list[str]:
    """``["jupyterhub", "-f", "/usr/local/etc/jupyterhub/jupyterhub_config.py"]``."""
    return command_line(hub_deployment(manifests), "hub")


# --- the hub's configuration -------------------------------------------------------------------


HUB_CONFIG_DIR = "/usr/local/etc/jupyterhub"


def _source_files(manifests: list[Manifest], source: dict[str, Any]) -> dict[str, str]:
    """``{path in the volume: content}`` of one configMap / secret volume (or projected
    source), its ``items`` applied as the kubelet does (without: every key)."""
    if "configMap" in source:
        ref = source["configMap"]
        data = find(manifests, "ConfigMap", ref["name"]).get("data", {})
    elif "secret" in source:
        ref = source["secret"]
        data = secret_data(manifests, ref.get("secretName") or ref["name"])
    else:
        raise KeyError(f"not a configMap or secret source: {sorted(source)}")
    items = ref.get("items")
    if items is None:
        return dict(data)
    return {item["path"]: data[item["key"]] for item in items}


def mounted_files(manifests: list[Manifest], deployment: Manifest, name: str,
                  mount_path: str) -> dict[str, str]:
    """The files a container sees in the directory ``mount_path``: ``{relative path: content}``,
    from the configMap, secret or projected volume mounted there (resolved against the
    rendered ConfigMaps and Secrets)."""
    mount = next((m for m in container(deployment, name).get("volumeMounts", [])
                  if m["mountPath"] == mount_path), None)
    if mount is None:
        raise KeyError(f"container {name!r} mounts nothing at {mount_path}")
    volume = next(v for v in deployment["spec"]["template"]["spec"]["volumes"]
                  if v["name"] == mount["name"])
    sources = volume["projected"]["sources"] if "projected" in volume else [volume]
    files: dict[str, str] = {}
    for source in sources:
        files.update(_source_files(manifests, source))
    return files


def hub_config_files(manifests: list[Manifest]) -> tuple[str, dict[str, Any]]:
    """``(jupyterhub_config.py source, values.json as a dict)`` as the hub container sees them
    in /usr/local/etc/jupyterhub: the first from the hub's ConfigMap, the second from the
    Secret ``<fullname>-hub-values`` (it may hold secrets), one projected volume."""
    files = mounted_files(manifests, hub_deployment(manifests), "hub", HUB_CONFIG_DIR)
    return files["jupyterhub_config.py"], json.loads(files["values.json"])


def write_hub_config(manifests: list[Manifest], directory: str | os.PathLike[str]) -> Path:
    """Write jupyterhub_config.py and values.json (as the pod mounts them) into ``directory``;
    returns the config file's path, for ``jupyterhub -f``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    source, values = hub_config_files(manifests)
    (directory / "values.json").write_text(json.dumps(values, indent=2))
    path = directory / "jupyterhub_config.py"
    path.write_text(source)
    return path


@contextlib.contextmanager
def environment(env: dict[str, str | None]) -> Iterator[None]:
    """Set (None: unset) environment variables for the ``with`` block, then restore them."""
    saved = {name: os.environ.get(name) for name in env}
    try:
        _set_environment(env)
        yield
    finally:
        _set_environment(saved)


def _set_environment(env: dict[str, str | None]) -> None:
    for name, value in env.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


def load_hub_config(manifests: list[Manifest], directory: str | os.PathLike[str],
                    env: dict[str, str | None] | None = None):
    """Run the rendered jupyterhub_config.py through traitlets' PyFileConfigLoader (as
    ``jupyterhub -f`` does) with the hub Deployment's environment (or ``env``); returns the
    resulting ``traitlets.config.Config``."""
    from traitlets.config.loader import PyFileConfigLoader

    path = write_hub_config(manifests, directory)
    with environment(hub_env(manifests) if env is None else env):
        return PyFileConfigLoader(path.name, path=str(path.parent)).load_config()


# --- a stand-in for the Kubernetes API, for ``lookup`` -----------------------------------------


@contextlib.contextmanager
def fake_api(objects: list[Manifest]) -> Iterator[str]:
    """Serve ``objects`` (namespaced core/v1 objects: Secrets, ConfigMaps) on 127.0.0.1 the way
    the Kubernetes API does for Helm's ``lookup``: discovery of /api/v1, then GET of one object.
    Yields the server's URL. Anything else is a 404 (``lookup`` then returns nothing)."""
    plural = {"Secret": "secrets", "ConfigMap": "configmaps"}
    by_path = {}
    for item in objects:
        meta = item["metadata"]
        namespace = meta.get("namespace", NAMESPACE)
        path = f"/api/v1/namespaces/{namespace}/{plural[item['kind']]}/{meta['name']}"
        by_path[path] = {**item, "metadata": {**meta, "namespace": namespace}}
    discovery = {
        "kind": "APIResourceList",
        "groupVersion": "v1",
        "resources": [
            {"name": name, "singularName": kind.lower(), "namespaced": True, "kind": kind,
             "verbs": ["get", "list"]}
            for kind, name in plural.items()
        ],
    }

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

        def do_GET(self) -> None:
            path = self.path.split("?")[0]
            body: dict[str, Any] | None = discovery if path == "/api/v1" else by_path.get(path)
            status = 200
            if body is None:
                status, body = 404, {"kind": "Status", "apiVersion": "v1", "status": "Failure",
                                     "reason": "NotFound", "code": 404}
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
