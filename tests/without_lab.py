"""A pytest plugin: a machine that neither the lab nor the installer has touched, for collection.

Loaded by tests/test_collection.py as ``-p tests.without_lab`` in a pytest that only collects.
While it is loaded, as on a brand-new machine:

- every user and group looked up by name (but root) does not exist (``KeyError``), as the lab's
  users do not until the lab first comes up;
- the places the lab or the packages it installs fill (the lab's run directory, /etc/slurm,
  /etc/munge, /var/lib/gridengine, /etc/netns, /home) read as missing;
- the test venv's extras (playwright, helm-python-sdk, kubernetes-validate, yamllint) cannot be
  imported.

A test module that uses any of these at import or collection time then fails collection, here on
every machine rather than only on a fresh one.
"""

from __future__ import annotations

import builtins
import grp
import io
import os
import pwd
import sys
from importlib.abc import MetaPathFinder

LAB_PLACES = ("/run/hub-spawner-lab", "/etc/slurm", "/etc/munge", "/var/lib/gridengine",
              "/etc/netns", "/home")
EXTRAS = ("playwright", "helm_python", "kubernetes_validate", "yamllint")


def _no_such_user(real):
    def lookup(name, *args):
        if name == "root":
            return real(name, *args)
        raise KeyError(f"{real.__name__}(): name not found: {name!r} (tests/without_lab.py: "
                       "no lab user exists at collection time)")
    return lookup


def _lab_place(path) -> bool:
    try:
        text = os.fsdecode(path) if not isinstance(path, int) else ""
    except TypeError:
        return False
    text = os.path.abspath(text) if text else ""
    return any(text == place or text.startswith(place + "/") for place in LAB_PLACES)


def _missing_in_the_lab(real):
    def call(path, *args, **kwargs):
        if _lab_place(path):
            raise FileNotFoundError(2, "No such file or directory (tests/without_lab.py: the "
                                       "lab has not made it at collection time)", str(path))
        return real(path, *args, **kwargs)
    return call


class _NoExtras(MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in EXTRAS:
            raise ModuleNotFoundError(f"No module named {name!r} (tests/without_lab.py: the "
                                      "installer's extras are not importable at collection time)",
                                      name=name)
        return None


pwd.getpwnam = _no_such_user(pwd.getpwnam)
grp.getgrnam = _no_such_user(grp.getgrnam)
builtins.open = io.open = _missing_in_the_lab(io.open)
for _name in ("stat", "lstat", "listdir", "scandir", "access", "open"):
    setattr(os, _name, _missing_in_the_lab(getattr(os, _name)))
for _module in [name for name in sys.modules if name.split(".")[0] in EXTRAS]:
    del sys.modules[_module]
sys.meta_path.insert(0, _NoExtras())
