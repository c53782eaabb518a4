"""The tunnel service: every forward between the hub side and the cluster, outside the hub.

A long-lived process (``python -m hub_spawner.tunnels --dir DIR``), like configurable-http-proxy:
the spawner starts it when it is not running and never stops it, so a hub restart drops no user
connection. Data plane: one OpenSSH ControlMaster per (login node, cluster user), forwards added
and removed with ``-O forward`` / ``-O cancel``; no user byte passes through Python. The service
keeps its forward table in ``DIR/forwards.json`` and restores every forward on its old port after
its own restart (masters that outlived it are adopted) or after an SSH drop (the master is
re-made). The hub talks to it over ``DIR/ctl``, a Unix socket only the hub's user can open.

Modules: ``forwards`` (the table and OpenSSH command lines; pure), ``service`` (the process),
``client`` (what the spawner uses).
"""
