#!/usr/bin/env bash
# The whole suite: lint, unit tests, then the integration tests on the real lab.
# pytest's exit status 5 ("no tests collected") is not a failure; every other non-zero is.
set -uo pipefail
cd "$(dirname "$0")/.."
LAB_PREFIX=${LAB_PREFIX:-/opt/hub-spawner-lab}
VENV=$LAB_PREFIX/venv

"$VENV/bin/ruff" check hub_spawner tests bench example_hub_config || exit 1

"$VENV/bin/python" -m pytest -p no:cacheprovider -rA "$@"
status=$?
if [ "$status" -eq 5 ]; then
    echo "tests/run.sh: pytest collected no tests (exit 5); treating as success"
    exit 0
fi
exit "$status"
