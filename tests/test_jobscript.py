"""hub_spawner/jobscript.py: the launcher, the env file and the ready-line parser."""

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from hub_spawner.jobscript import (
    READY_MARKER,
    ReadyLine,
    last_lines,
    parse_ready_line,
    render_env_file,
    render_launch,
    same_host,
    server_address,
)


def test_ready_line_is_parsed_from_real_output():
    output = "[I ServerApp] running\nHUB_SPAWNER_READY {\"host\": \"compute\", \"port\": 33635}\n"
    assert parse_ready_line(output) == ReadyLine("compute", 33635)


def test_no_ready_line_yet_is_none():
    assert parse_ready_line("starting...\n") is None
    assert parse_ready_line("") is None


def test_last_ready_line_wins():
    output = (f'{READY_MARKER} {{"host": "a", "port": 40001}}\n'
              f'{READY_MARKER} {{"host": "b", "port": 40002}}\n')
    assert parse_ready_line(output) == ReadyLine("b", 40002)


@pytest.mark.parametrize(
    "payload",
    [
        "not json",
        '{"host": "compute"}',
        '{"host": "compute; rm -rf /", "port": 80}',
        '{"host": "-oProxyCommand=x", "port": 80}',
        '{"host": "compute", "port": 0}',
        '{"host": "compute", "port": 70000}',
        '{"host": "compute", "port": "80"}',
        '{"host": "compute", "port": true}',
        '["compute", 80]',
    ],
)
def test_malformed_ready_line_is_an_error(payload):
    with pytest.raises(ValueError):
        parse_ready_line(f"{READY_MARKER} {payload}\n")


def test_same_host_is_the_same_name_or_the_short_name_of_the_other():
    """Grid Engine knows nodes by their full names, and nodes call themselves by either."""
    assert same_host("cn017", "cn017")
    assert same_host("CN017.Cluster.Example", "cn017.cluster.example")
    assert same_host("cn017.cluster.example", "cn017")
    assert same_host("cn017", "CN017.cluster.example")
    assert not same_host("cn018", "cn017")


@pytest.mark.parametrize(("reported", "scheduled"), [
    ("cn017.a.example", "cn017.b.example"),  # two full names that differ
    ("elsewhere.127.0.0.1.nip.io", "cn017"),
    ("cn0170", "cn017"),
    ("cn01", "cn017"),
    ("cn0170.cluster.example", "cn017"),
    ("127.0.0.1", "cn017"),
])
def test_same_host_refuses_another_host(reported, scheduled):
    assert not same_host(reported, scheduled)


def test_server_address_dials_the_schedulers_node_with_the_ready_lines_port():
    assert server_address(ReadyLine("CN017", 43211), "cn017") == ReadyLine("cn017", 43211)
    assert server_address(ReadyLine("cn017.cluster.example", 43211), "cn017") == ReadyLine(
        "cn017", 43211)


def test_the_schedulers_own_name_for_the_node_in_the_ready_line_is_enough():
    """A Slurm NodeName may differ from the node's host name: the job also says
    ``SLURMD_NODENAME``."""
    ready = parse_ready_line(
        f'{READY_MARKER} {{"host": "node-a17", "node": "cn017", "port": 43211}}\n')
    assert ready.node == "cn017"
    assert server_address(ready, "cn017") == ReadyLine("cn017", 43211)
    with pytest.raises(ValueError, match="the job says its server is on 'node-a17'"):
        server_address(ready, "cn018")
    # An empty or unusable node name is left out (other schedulers print it empty).
    for node in ('""', '"x y"', '["cn017"]', '"-oProxyCommand=x"'):
        line = f'{READY_MARKER} {{"host": "node-a17", "node": {node}, "port": 43211}}\n'
        assert parse_ready_line(line).node == ""


@pytest.mark.parametrize(("ready", "scheduled"), [
    (ReadyLine("elsewhere.127.0.0.1.nip.io", 43211), "cn017"),
    (ReadyLine("127.0.0.1", 43211), "cn017"),
    (ReadyLine("cn017", 43211), "cn017\n"),
    (ReadyLine("cn017", 43211), "-oProxyCommand=x"),
    (ReadyLine("cn017", 43211), ""),
])
def test_server_address_refuses_another_host_or_a_bad_node_name(ready, scheduled):
    with pytest.raises(ValueError):
        server_address(ready, scheduled)


@pytest.mark.parametrize("port", [1, 22, 80, 443, 1023, 65536])
def test_ready_line_port_must_be_an_unprivileged_port(port):
    with pytest.raises(ValueError, match="1024-65535"):
        parse_ready_line(f'{READY_MARKER} {{"host": "compute", "port": {port}}}\n')


@pytest.mark.parametrize("port", [1024, 65535])
def test_ready_line_port_range_includes_its_ends(port):
    output = f'{READY_MARKER} {{"host": "compute", "port": {port}}}\n'
    assert parse_ready_line(output) == ReadyLine("compute", port)


@pytest.mark.parametrize("host", ["compute\n", "compute\nrm", "\ncompute", "compute ", "-x"])
def test_ready_line_host_with_a_line_break_is_refused(host):
    payload = json.dumps({"host": host, "port": 43211})
    with pytest.raises(ValueError, match="invalid host"):
        parse_ready_line(f"{READY_MARKER} {payload}\n")


@pytest.mark.parametrize("name", ["A\n", "PATH\nX", "A B"])
def test_env_name_with_a_line_break_is_refused(name):
    with pytest.raises(ValueError):
        render_env_file({name: "x"})


@pytest.mark.parametrize("ip", ["127.0.0.1\n", "0.0.0.0\n; id", "::1 "])
def test_listen_ip_with_a_line_break_is_refused(ip):
    with pytest.raises(ValueError, match="not an IP address"):
        render_launch(command=["true"], secrets_path="/x.env", listen_ip=ip)


def test_last_lines_skips_blank_lines():
    assert last_lines("a\n\nb\nc\n\n", 2) == "b\nc"


def test_env_file_round_trips_hostile_values_through_bash(tmp_path):
    env = {
        "JUPYTERHUB_API_TOKEN": "abc'def\"$(touch pwned)`id`",
        "MULTI": "line1\nline2",
        "EMPTY": "",
    }
    path = tmp_path / "env"
    path.write_text(render_env_file(env))
    script = (
        "set -a; . ./env; set +a; "
        "printf '%s\\0' \"$JUPYTERHUB_API_TOKEN\" \"$MULTI\" \"$EMPTY\""
    )
    out = subprocess.run(["bash", "-c", script], cwd=tmp_path, capture_output=True, check=True)
    assert out.stdout.split(b"\0")[:3] == [v.encode() for v in env.values()]
    assert not (tmp_path / "pwned").exists()


@pytest.mark.parametrize("name", ["A B", "1ABC", "A;B", "A=B", ""])
def test_env_file_rejects_bad_names(name):
    with pytest.raises(ValueError):
        render_env_file({name: "x"})


def test_launch_quotes_command_and_paths():
    launch = render_launch(
        command=["/opt/venv/bin/jupyterhub-singleuser", "--arg=$(id)", "a b"],
        secrets_path="/home/al ice/.hub-spawner/x.env",
    )
    assert "hub_spawner_secrets='/home/al ice/.hub-spawner/x.env'" in launch
    assert "/opt/venv/bin/jupyterhub-singleuser '--arg=$(id)' 'a b' &" in launch


def lines_until_ready(process: subprocess.Popen) -> list[str]:
    """The launcher's output lines up to and with its ready line."""
    lines: list[str] = []
    while not lines or READY_MARKER not in lines[-1]:
        lines.append(process.stdout.readline())
        assert lines[-1], f"the launcher ended without a ready line: {lines}"
    return lines


def test_launch_runs_a_server_and_prints_the_ready_line(tmp_path):
    """Runs the real launcher under bash with a stand-in server (python's http.server)."""
    secrets = tmp_path / "server.env"
    secrets.write_text(render_env_file({"HUB_SPAWNER_TEST_SECRET": "s3cret"}))
    os.chmod(secrets, 0o600)
    server = (
        "import os, http.server, urllib.parse\n"
        'assert os.environ["HUB_SPAWNER_TEST_SECRET"] == "s3cret"\n'
        'port = urllib.parse.urlparse(os.environ["JUPYTERHUB_SERVICE_URL"]).port\n'
        'http.server.HTTPServer(("127.0.0.1", port), http.server.SimpleHTTPRequestHandler)'
        ".serve_forever()\n"
    )
    launch = render_launch(command=["python3", "-c", server], secrets_path=str(secrets),
                           ready_timeout_seconds=20)
    process = subprocess.Popen(["bash", "-c", launch], stdout=subprocess.PIPE, text=True,
                               cwd=tmp_path)
    try:
        lines = lines_until_ready(process)
        ready = parse_ready_line(lines[-1])
        assert ready is not None and ready.host == socket.gethostname()
        # Timestamps for whoever reads the output (and bench/spawn_latency.py), in order.
        started, server, listens = (float(line.rsplit(" at ", 1)[1]) for line in lines[:3])
        assert lines[0].startswith(f"hub_spawner: job started on {socket.gethostname()} at ")
        assert lines[1].startswith("hub_spawner: starting the server at ")
        assert lines[2].startswith("hub_spawner: the server listens at ")
        assert started <= server <= listens <= time.time()
        assert not secrets.exists(), "the launcher deletes the secrets file once it has read it"
        with urllib.request.urlopen(f"http://127.0.0.1:{ready.port}/") as response:
            assert response.status == 200
    finally:
        process.terminate()  # the launcher passes SIGTERM on to the server
    assert process.wait(timeout=20) != 0


def test_launch_reports_a_server_that_dies_before_listening(tmp_path):
    secrets = tmp_path / "server.env"
    secrets.write_text("")
    launch = render_launch(command=["sh", "-c", "echo boom >&2; exit 7"],
                           secrets_path=str(secrets))
    result = subprocess.run(["bash", "-c", launch], capture_output=True, text=True, timeout=20)
    assert result.returncode == 7
    assert READY_MARKER not in result.stdout
    assert "boom" in result.stderr and "exited with status 7 before it listened" in result.stderr


def test_launch_fails_clearly_without_secrets_file(tmp_path):
    launch = render_launch(command=["true"], secrets_path=str(tmp_path / "missing.env"))
    result = subprocess.run(["bash", "-c", launch], capture_output=True, text=True, timeout=20)
    assert result.returncode == 1
    assert "cannot read the server's environment file" in result.stderr
    assert str(tmp_path / "missing.env") in result.stderr


@pytest.mark.parametrize("python", ['/opt/py"; touch CANARY; "', "/opt/py'; touch CANARY; '",
                                    "$(touch CANARY)", "`touch CANARY`", "py\ntouch CANARY"])
def test_a_hostile_job_python_is_one_quoted_word_and_never_runs_code(tmp_path, python):
    """job_python used to be pasted, quoted, inside a double-quoted echo: its own quotes ended
    that string and the rest ran. Now it is one word everywhere; the launcher only fails."""
    secrets = tmp_path / "server.env"
    secrets.write_text("")
    launch = render_launch(command=["true"], secrets_path=str(secrets), python=python)
    result = subprocess.run(["bash", "-c", launch], capture_output=True, text=True, timeout=20,
                            cwd=tmp_path)
    assert not (tmp_path / "CANARY").exists()
    assert result.returncode == 1
    assert "could not choose a free port" in result.stderr
    assert f"(is {python} on PATH?)" in result.stderr


def test_a_job_python_path_with_spaces_works(tmp_path):
    bindir = tmp_path / "my python"
    bindir.mkdir()
    (bindir / "python3").symlink_to(sys.executable)
    secrets = tmp_path / "server.env"
    secrets.write_text("")
    launch = render_launch(command=["sh", "-c", "exit 5"], secrets_path=str(secrets),
                           python=str(bindir / "python3"))
    result = subprocess.run(["bash", "-c", launch], capture_output=True, text=True, timeout=20)
    assert result.returncode == 5, result.stderr  # a port was chosen, then the server exited


def _run_launch_until(tmp_path, command, route_to=""):
    secrets = tmp_path / "server.env"
    secrets.write_text("")
    launch = render_launch(command=command, secrets_path=str(secrets), route_to=route_to,
                           ready_timeout_seconds=20)
    return subprocess.Popen(["bash", "-c", launch], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=tmp_path)


def test_the_server_listens_on_the_address_towards_the_login_node(tmp_path):
    """route_to: the launcher asks the kernel which address it would use towards that host
    (here loopback) and gives the server only that address."""
    server = ("import os, http.server, urllib.parse\n"
              'url = urllib.parse.urlparse(os.environ["JUPYTERHUB_SERVICE_URL"])\n'
              "open('url', 'w').write(url.netloc)\n"
              "http.server.HTTPServer((url.hostname, url.port), "
              "http.server.SimpleHTTPRequestHandler).serve_forever()\n")
    process = _run_launch_until(tmp_path, ["python3", "-c", server], route_to="127.0.0.1")
    try:
        ready = parse_ready_line(lines_until_ready(process)[-1])
        assert ready is not None
        assert (tmp_path / "url").read_text() == f"127.0.0.1:{ready.port}"
    finally:
        process.terminate()
        process.wait(timeout=20)


def test_a_port_taken_by_another_process_is_not_reported_ready(tmp_path):
    """Between the port probe and the server's bind, another process takes the port: it
    answers the launcher's connection test, but it is not the server, so no ready line for
    it; the launcher tries another port (where this stand-in never listens: it times out)."""
    stand_in = ("import os, time, urllib.parse\n"
                'url = urllib.parse.urlparse(os.environ["JUPYTERHUB_SERVICE_URL"])\n'
                "open('port', 'w').write(str(url.port))\n"
                "time.sleep(30)\n")  # never listens itself
    process = _run_launch_until(tmp_path, ["python3", "-c", stand_in])
    squatter = socket.socket()
    try:
        for _ in range(100):
            if (tmp_path / "port").exists() and (tmp_path / "port").read_text():
                break
            time.sleep(0.1)
        squatter.bind(("127.0.0.1", int((tmp_path / "port").read_text())))
        squatter.listen()
        out, err = process.communicate(timeout=30)
    finally:
        squatter.close()
        if process.poll() is None:
            process.kill()
    assert process.returncode == 1
    assert READY_MARKER not in out
    assert "was taken by another process; trying another port" in err
    assert "did not listen on port" in err


def test_a_server_that_loses_its_port_to_another_process_gets_another(tmp_path):
    """Two jobs on one node drew the same free port: the other one's listener holds it when
    our server binds, and ours exits. The launcher picks another port and starts the server
    again; the ready line names the new port."""
    server = ("import os, http.server, time, urllib.parse\n"
              'url = urllib.parse.urlparse(os.environ["JUPYTERHUB_SERVICE_URL"])\n'
              "open('port', 'a').write(f'{url.port}\\n')\n"
              "while not os.path.exists('go'):\n"
              "    time.sleep(0.05)\n"
              "http.server.HTTPServer((url.hostname, url.port), "
              "http.server.SimpleHTTPRequestHandler).serve_forever()\n")
    process = _run_launch_until(tmp_path, ["python3", "-c", server])
    squatter = socket.socket()
    try:
        for _ in range(100):
            if (tmp_path / "port").exists() and (tmp_path / "port").read_text():
                break
            time.sleep(0.1)
        first = int((tmp_path / "port").read_text().split()[0])
        squatter.bind(("0.0.0.0", first))
        squatter.listen()
        (tmp_path / "go").write_text("")
        ready = parse_ready_line(lines_until_ready(process)[-1])
        assert ready is not None and ready.port != first
        assert [int(p) for p in (tmp_path / "port").read_text().split()] == [first, ready.port]
        with urllib.request.urlopen(f"http://127.0.0.1:{ready.port}/") as response:
            assert response.status == 200
    finally:
        squatter.close()
        process.terminate()
        process.wait(timeout=20)
    assert "was taken by another process; trying another port" in process.stderr.read()


def test_a_route_that_is_not_a_host_name_is_refused():
    with pytest.raises(ValueError, match="not a host name or address"):
        render_launch(command=["true"], secrets_path="/x.env", route_to="login; id")


# --- socket mode (no open port) --------------------------------------------------------------

_SOCKET_SERVER = (
    "import os, socket, stat, sys\n"
    'path = [a.split("=", 1)[1] for a in sys.argv if a.startswith("--sock=")][0]\n'
    'assert "--sock-mode=0600" in sys.argv\n'
    'print("service url", os.environ["JUPYTERHUB_SERVICE_URL"], flush=True)\n'
    "server = socket.socket(socket.AF_UNIX)\n"
    "server.bind(path)\n"
    "os.chmod(path, 0o600)\n"
    "server.listen()\n"
    "while True:\n"
    "    connection, _ = server.accept()\n"
    "    try:\n"
    '        connection.sendall(b"hello from the socket")\n'
    "    except OSError:\n"
    "        pass  # the launcher's readiness probe hangs up at once\n"
    "    connection.close()\n"
)


def test_socket_launch_serves_on_a_private_socket_and_names_it_in_the_ready_line(tmp_path):
    """The real launcher in socket mode, with a stand-in server that binds ``--sock``: a 0700
    directory of its own under TMPDIR, a 0600 socket, no TCP port, and the directory is gone
    once the server ends."""
    secrets = tmp_path / "server.env"
    secrets.write_text("")
    launch = render_launch(command=[sys.executable, "-c", _SOCKET_SERVER, "--"],
                           secrets_path=str(secrets), ready_timeout_seconds=20, socket=True)
    process = subprocess.Popen(["bash", "-c", launch], stdout=subprocess.PIPE, text=True,
                               cwd=tmp_path, env=dict(os.environ, TMPDIR=str(tmp_path)))
    try:
        lines = [line for line in lines_until_ready(process) if "hub_spawner:" not in line]
        assert lines[0].strip() == "service url http://127.0.0.1:8888/", lines
        ready = parse_ready_line(lines[1])
        assert ready is not None and ready.port == 0 and ready.host == socket.gethostname()
        directory = os.path.dirname(ready.socket)
        assert os.path.dirname(directory) == str(tmp_path)
        assert os.stat(directory).st_mode & 0o777 == 0o700
        assert os.stat(ready.socket).st_mode & 0o777 == 0o600
        with socket.socket(socket.AF_UNIX) as client:
            client.connect(ready.socket)
            assert client.recv(100) == b"hello from the socket"
    finally:
        process.terminate()
    process.wait(timeout=20)
    assert not os.path.exists(directory), "the launcher removes the socket's directory"


def test_socket_launch_reports_a_server_that_dies_before_listening(tmp_path):
    secrets = tmp_path / "server.env"
    secrets.write_text("")
    launch = render_launch(command=["sh", "-c", "echo boom >&2; exit 7", "--"],
                           secrets_path=str(secrets), socket=True)
    result = subprocess.run(["bash", "-c", launch], capture_output=True, text=True, timeout=20,
                            env=dict(os.environ, TMPDIR=str(tmp_path)))
    assert result.returncode == 7
    assert READY_MARKER not in result.stdout
    assert "exited with status 7 before it listened" in result.stderr
    assert not list(tmp_path.glob("hub-spawner.*")), "no socket directory is left behind"


def test_socket_launch_refuses_a_tmpdir_too_long_for_a_socket_path(tmp_path):
    deep = tmp_path / ("d" * 90)
    deep.mkdir()
    secrets = tmp_path / "server.env"
    secrets.write_text("")
    launch = render_launch(command=["true"], secrets_path=str(secrets), socket=True)
    result = subprocess.run(["bash", "-c", launch], capture_output=True, text=True, timeout=20,
                            env=dict(os.environ, TMPDIR=str(deep)))
    assert result.returncode == 1
    assert "longer than 100 bytes; set TMPDIR to a shorter directory" in result.stderr
    assert not list(deep.iterdir())


def test_a_socket_ready_line_is_parsed():
    line = f'{READY_MARKER} {{"host": "cn1", "socket": "/tmp/hub-spawner.aB3/server.sock"}}\n'
    assert parse_ready_line(line) == ReadyLine("cn1", 0, "/tmp/hub-spawner.aB3/server.sock")
    assert server_address(parse_ready_line(line), "cn1").socket == (
        "/tmp/hub-spawner.aB3/server.sock")


@pytest.mark.parametrize(
    "payload",
    [
        '{"host": "cn1", "socket": "relative/server.sock"}',
        '{"host": "cn1", "socket": "/tmp/../etc/x.sock"}',
        '{"host": "cn1", "socket": "/tmp/./x.sock"}',
        '{"host": "cn1", "socket": "/tmp/a b.sock"}',
        '{"host": "cn1", "socket": "/tmp/x.sock\\n-oProxyCommand=id"}',
        '{"host": "cn1", "socket": "/tmp/x;id"}',
        '{"host": "cn1", "socket": "/' + "s" * 101 + '"}',
        '{"host": "cn1", "socket": 7}',
        '{"host": "cn1", "socket": "/tmp/x.sock", "port": 4000}',
    ],
)
def test_a_bad_socket_ready_line_is_an_error(payload):
    with pytest.raises(ValueError):
        parse_ready_line(f"{READY_MARKER} {payload}\n")


def test_socket_launch_makes_a_plain_path_of_a_tmpdir_with_a_trailing_slash_and_dots(tmp_path):
    secrets = tmp_path / "server.env"
    secrets.write_text("")
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    launch = render_launch(command=[sys.executable, "-c", _SOCKET_SERVER, "--"],
                           secrets_path=str(secrets), ready_timeout_seconds=20, socket=True)
    process = subprocess.Popen(["bash", "-c", launch], stdout=subprocess.PIPE, text=True,
                               cwd=tmp_path,
                               env=dict(os.environ, TMPDIR=f"{tmp_path}/./link/"))
    try:
        ready = parse_ready_line(lines_until_ready(process)[-1])
        assert ready is not None, "the hub would refuse the socket path"
        assert os.path.dirname(os.path.dirname(ready.socket)) == str(tmp_path / "real")
    finally:
        process.terminate()
    process.wait(timeout=20)
