"""The Helm chart's ``spawner`` values, generated from the spawner's options.

    python -m hub_spawner.chart_schema           # rewrite helm/hub-spawner/values.schema.json
    python -m hub_spawner.chart_schema --check   # exit 1 when it is not up to date

Each ``config=True`` option of the spawner classes (and the JupyterHub ``Spawner`` options in
``FROM_JUPYTERHUB``) is a key of ``spawner`` in camelCase (``default_cpus`` -> ``defaultCpus``;
inside a structure, such as a partition or a preset, keys stay as the option documents them),
with a JSON schema derived from its trait type; options of one scheduler's class are keys of
``spawner.slurm``, ``spawner.sge`` or ``spawner.torque``. ``SET_BY_THE_CHART`` names the options
the chart sets from its other values (and why); an option in neither list makes
``tests/test_chart_schema.py`` fail, so the values cannot drift from the options.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from pathlib import Path
from typing import Any

from traitlets import (
    Bool,
    Callable,
    Dict,
    Enum,
    Float,
    Int,
    List,
    Set,
    TraitType,
    Tuple,
    Unicode,
    Union,
)

from .spawner import SGESSHSpawner, SlurmSSHSpawner, SSHBatchSpawner, TorqueSSHSpawner

SCHEMA_PATH = Path(__file__).resolve().parent.parent / "helm" / "hub-spawner" / "values.schema.json"
SCHEDULER_CLASSES = {"slurm": SlurmSSHSpawner, "sge": SGESSHSpawner, "torque": TorqueSSHSpawner}

#: JupyterHub's own Spawner options that a site sets in values (the rest are the hub's business
#: or take callables).
FROM_JUPYTERHUB = ("cmd", "args", "default_url", "notebook_dir", "environment", "env_keep",
                   "start_timeout", "http_timeout", "poll_interval", "disable_user_config",
                   "debug")

#: Options the chart sets itself, from other values or the pods' layout: never in ``spawner``.
SET_BY_THE_CHART = {
    "login_host": "cluster.loginHost",
    "login_hosts": "cluster.loginHosts",
    "login_port": "cluster.loginPort",
    "cluster_username": "cluster.username",
    "hub_api_tunnel_host": "cluster.hubApiTunnelHost",
    "hub_api_tunnel_hosts": "cluster.hubApiTunnelHosts",
    "known_hosts_path": "cluster.knownHosts (mounted)",
    "ssh_key_path_template": "identity.mode keys (the keys Secret, mounted)",
    "ssh_ca_key_path": "identity.mode certificate (identity.caKeySecret, mounted)",
    "ssh_certificate_minutes": "identity.certificateMinutes",
    "auth_state_ssh_key": "identity.authState.keyName",
    "auth_state_ssh_certificate": "identity.authState.certificateName",
    "tunnel_service_dir": "the tunnels pod's volume",
    "tunnel_service_address": "the tunnels Service",
    "tunnel_service_token": "the generated tunnels.token",
    "tunnel_service_python": "the tunnels pod runs the service",
    "tunnel_service_start": "the tunnels pod runs the service",
    "tunnel_bind_ip": "the tunnels pod's address",
    "tunnel_connect_host": "the tunnels Service",
}

#: Constraints beyond the trait's type (the traits' own validators say the same at start-up;
#: here ``helm install`` says it first).
EXTRAS: dict[str, dict[str, Any]] = {
    "default_cpus": {"minimum": 1},
    "max_cpus": {"minimum": 1},
    "default_memory": {"pattern": "^([0-9]+[KMGT]?)?$"},
    "max_memory": {"pattern": "^[0-9]+[KMGT]?$"},
    "default_gpus": {"minimum": 0},
    "max_gpus": {"minimum": 0},
    "default_walltime": {"minLength": 1},
    "max_walltime": {"minLength": 1},
    "job_python": {"minLength": 1},
    "remote_state_dir": {"minLength": 1},
    "ssh_connect_timeout": {"exclusiveMinimum": 0},
    "command_timeout": {"exclusiveMinimum": 0},
    "status_interval": {"exclusiveMinimum": 0},
    "status_interval_max": {"exclusiveMinimum": 0},
    "stop_wait": {"minimum": 0},
    "stop_cancel_timeout": {"exclusiveMinimum": 0},
    "reconcile": {"enum": ["cancel", "log"]},
    "reconcile_grace": {"minimum": 0},
    "hub_id": {"pattern": "^[a-z0-9]{1,8}$"},
    "cmd": {"minItems": 1},
    "start_timeout": {"minimum": 1},
    "http_timeout": {"minimum": 1},
    "gpu_gres": {"minLength": 1},
    "memory_resource": {"minLength": 1},
    "gpu_resource": {"minLength": 1},
}


def camel(name: str) -> str:
    """``default_cpus`` -> ``defaultCpus`` (the chart's config turns it back)."""
    first, *rest = name.split("_")
    return first + "".join(part.capitalize() for part in rest)


def trait_schema(trait: TraitType) -> dict[str, Any] | None:
    """The JSON schema of a trait's values; None for one that only takes code (a callable)."""
    if isinstance(trait, Union):
        kinds = [s for s in (trait_schema(each) for each in trait.trait_types) if s is not None]
        if not kinds:
            return None
        return kinds[0] if len(kinds) == 1 else {"anyOf": kinds}
    if isinstance(trait, Callable):
        return None
    if isinstance(trait, Bool):
        return {"type": "boolean"}
    if isinstance(trait, (Int, Float)):
        schema: dict[str, Any] = {"type": "integer" if isinstance(trait, Int) else "number"}
        for bound, key in ((getattr(trait, "min", None), "minimum"),
                           (getattr(trait, "max", None), "maximum")):
            if bound is not None and math.isfinite(bound):  # JSON has no infinity
                schema[key] = bound
        return schema
    if isinstance(trait, Enum):
        return {"enum": list(trait.values)}
    if isinstance(trait, Unicode):
        return {"type": "string"}
    if isinstance(trait, (List, Set, Tuple)):
        schema = {"type": "array"}
        inner = getattr(trait, "_trait", None)
        items = trait_schema(inner) if isinstance(inner, TraitType) else None
        if items is not None:
            schema["items"] = items
        return schema
    if isinstance(trait, Dict):
        schema = {"type": "object"}
        value = getattr(trait, "_value_trait", None)
        values = trait_schema(value) if isinstance(value, TraitType) else None
        if values is not None:
            schema["additionalProperties"] = values
        return schema
    return {}  # any JSON value (the trait checks it at start-up)


def summary(trait: TraitType, name: str) -> str:
    """The help's first sentence, with the option's name."""
    text = " ".join((trait.help or "").split())
    sentence = re.split(r"(?<=[.:;])\s", text, maxsplit=1)[0].rstrip(".:;")
    if len(sentence) > 200:
        sentence = sentence[:197].rsplit(" ", 1)[0] + "..."
    return f"{name}: {sentence}." if sentence else f"{name}."


def options(cls: type, own_only: bool) -> dict[str, TraitType]:
    """The options of ``cls`` that values can set: its own (``own_only``), or its own and its
    bases' up to JupyterHub's, with ``FROM_JUPYTERHUB`` of JupyterHub's own."""
    traits = cls.class_own_traits(config=True) if own_only else {
        name: trait for name, trait in cls.class_traits(config=True).items()
        if trait.this_class.__module__.startswith("hub_spawner.") or name in FROM_JUPYTERHUB}
    return {name: trait for name, trait in sorted(traits.items())
            if name not in SET_BY_THE_CHART}


def properties(cls: type, own_only: bool) -> dict[str, Any]:
    found = {}
    for name, trait in options(cls, own_only).items():
        schema = trait_schema(trait)
        if schema is None:
            raise ValueError(f"{cls.__name__}.{name} takes code only: add it to "
                             "SET_BY_THE_CHART (with why) or give it a value type")
        found[camel(name)] = {**schema, **EXTRAS.get(name, {}),
                              "description": summary(trait, name)}
    return found


def spawner_schema() -> dict[str, Any]:
    """The schema of the chart's ``spawner`` values."""
    props = properties(SSHBatchSpawner, own_only=False)
    for scheduler, cls in SCHEDULER_CLASSES.items():
        props[scheduler] = {
            "type": "object", "additionalProperties": False,
            "description": f"{cls.__name__}'s own options (only with cluster.scheduler "
                           f"{scheduler}).",
            "properties": properties(cls, own_only=True),
        }
    return {
        "type": "object", "additionalProperties": False,
        "description": "The spawner's options in camelCase (c.SSHBatchSpawner.<option>), "
                       "generated from them by python -m hub_spawner.chart_schema.",
        "properties": props,
    }


def updated_schema(text: str) -> str:
    schema = json.loads(text)
    schema["properties"]["spawner"] = spawner_schema()
    return json.dumps(schema, indent=2) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hub_spawner.chart_schema",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true",
                        help="only check that the chart's schema is up to date")
    args = parser.parse_args(argv)
    current = SCHEMA_PATH.read_text()
    wanted = updated_schema(current)
    if args.check:
        if current != wanted:
            print(f"{SCHEMA_PATH} is out of date: run python -m hub_spawner.chart_schema",
                  file=sys.stderr)
            return 1
        print(f"{SCHEMA_PATH.name} is up to date")
        return 0
    SCHEMA_PATH.write_text(wanted)
    return 0


if __name__ == "__main__":
    sys.exit(main())
