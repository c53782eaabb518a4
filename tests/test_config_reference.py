"""docs/configuration.md: up to date with the code, and every option it documents has help."""

import argparse

import pytest

from hub_spawner import config_reference
from hub_spawner.tunnels.service import build_parser


def test_committed_reference_is_up_to_date():
    path = config_reference.REFERENCE_PATH
    committed = path.read_text(encoding="utf-8") if path.exists() else ""
    assert committed == config_reference.render_reference(), config_reference.STALE_MESSAGE


def test_reference_is_the_same_whatever_the_terminal_width(monkeypatch):
    before = config_reference.tunnel_service_help()
    monkeypatch.setenv("COLUMNS", "40")
    assert config_reference.tunnel_service_help() == before


@pytest.mark.parametrize("cls", config_reference.DOCUMENTED_CLASSES, ids=lambda cls: cls.__name__)
def test_every_option_has_help(cls):
    missing = [
        f"{cls.__name__}.{name}"
        for name, trait in config_reference.own_config_traits(cls)
        if not (trait.help or "").strip()
    ]
    assert not missing, f"options without help=: {', '.join(missing)}"


def test_every_tunnel_service_argument_has_help():
    missing = [
        "/".join(action.option_strings) or action.dest
        for action in build_parser()._actions
        if not action.help or action.help == argparse.SUPPRESS
    ]
    assert not missing, f"tunnel service arguments without help: {', '.join(missing)}"
