# Two commands matter (README): `make demo` and `make test`. Both install what they need first.
LAB_PREFIX ?= /opt/hub-spawner-lab
PYTHON := $(LAB_PREFIX)/venv/bin/python
SCHEDULER ?= slurm
# make test PYTEST_ARGS='tests/test_form.py -x': only those (the default is the whole suite).
PYTEST_ARGS ?=

.PHONY: install demo test image fresh-check lint bench bench-tunnel bench-hub bench-spawn bench-scale bench-users

install:
	LAB_PREFIX=$(LAB_PREFIX) tests/lab/install.sh

demo: install
	LAB_PREFIX=$(LAB_PREFIX) $(PYTHON) -m tests.lab.demo --scheduler $(SCHEDULER)

test: install
	LAB_PREFIX=$(LAB_PREFIX) tests/run.sh $(PYTEST_ARGS)

# The chart's image from the Dockerfile, with Debian's podman on a Debian 12 base made here
# (tests/lab/image.py): localhost/hub-spawner:test.
image: install
	LAB_PREFIX=$(LAB_PREFIX) $(PYTHON) -m tests.lab.image

# README's two commands in a really fresh Debian 12 root (see tests/fresh_check.sh): make test, then
# make demo driven through a browser. Run it before a change to the lab, installer, Makefile or
# fixtures lands. Not while another lab is up.
fresh-check:
	PYTEST_ARGS="$(PYTEST_ARGS)" tests/fresh_check.sh

lint: install
	$(LAB_PREFIX)/venv/bin/ruff check hub_spawner tests bench example_hub_config

# Benchmarks (bench/RESULTS.md): tunnel vs ssh -L, then the hub's load while servers download.
bench: bench-tunnel bench-hub bench-spawn bench-scale bench-users

bench-tunnel: install
	LAB_PREFIX=$(LAB_PREFIX) $(PYTHON) -m bench.tunnel_bench

bench-hub: install
	LAB_PREFIX=$(LAB_PREFIX) $(PYTHON) -m bench.hub_load_bench

bench-spawn: install
	LAB_PREFIX=$(LAB_PREFIX) $(PYTHON) -m bench.spawn_latency

bench-scale: install
	LAB_PREFIX=$(LAB_PREFIX) $(PYTHON) -m bench.scale_bench

bench-users: install
	LAB_PREFIX=$(LAB_PREFIX) $(PYTHON) -m bench.users_bench
