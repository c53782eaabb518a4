# The hub image of the Helm chart (helm/hub-spawner): JupyterHub + hub_spawner. The same image
# runs the tunnel service (python -m hub_spawner.tunnels, which runs OpenSSH's ssh), the idle
# culler and the pods' keys-copy containers (sh, cp, cmp).
#
#   podman build -t registry.example.org/hub-spawner:0.1.0 .     # or docker build
#
# BASE: any Debian-based image with python3 >= 3.10: python:3.11-slim by default, or a Debian
# root made by mmdebstrap and imported with `podman import` (what `make image` and the tests do,
# where no registry is reachable). Whatever of openssh-client, tini and python3-venv it lacks is
# installed with apt-get.
# Build secret pip_ca (optional): a CA bundle for pip behind a TLS-intercepting proxy, e.g.
#   --secret id=pip_ca,src=/etc/ssl/certs/ca-certificates.crt
# It is used by the pip step only and is not kept in the image.
ARG BASE=python:3.11-slim
FROM ${BASE}

# openssh-client: the tunnel service's ssh. tini: PID 1 that reaps the ssh processes.
# python3-venv: Debian's python3 has no ensurepip without it (python:3.11-slim has its own).
RUN missing=""; \
    command -v ssh >/dev/null 2>&1 || missing="$missing openssh-client"; \
    command -v tini >/dev/null 2>&1 || missing="$missing tini"; \
    python3 -c 'import ensurepip' >/dev/null 2>&1 || missing="$missing python3-venv"; \
    if [ -n "$missing" ]; then \
        apt-get update \
        && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends $missing \
        && rm -rf /var/lib/apt/lists/*; \
    fi

# uid/gid 1000, as the chart's securityContext; OpenSSH needs the uid to have a passwd entry.
RUN groupadd --gid 1000 jupyterhub \
    && useradd --uid 1000 --gid 1000 --create-home --home-dir /home/jupyterhub \
        --shell /usr/sbin/nologin jupyterhub \
    && install -d -m 0700 -o 1000 -g 1000 /home/jupyterhub/.ssh \
    && install -d -m 0755 -o 1000 -g 1000 /srv/jupyterhub /srv/tunnels /usr/local/etc/jupyterhub

# A venv, so that the same steps work whichever python3 the base has (Debian 12's refuses a
# system-wide pip install, PEP 668). PATH in full: an imported base has no environment at all.
ENV VIRTUAL_ENV=/opt/hub-spawner \
    PATH=/opt/hub-spawner/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin

COPY pyproject.toml README.md LICENSE /src/hub_spawner/
COPY hub_spawner /src/hub_spawner/hub_spawner
# The versions make test runs (tests/lab/requirements.txt; tests/test_helm_chart.py keeps them
# equal). psycopg2-binary / pymysql: for hub.db.type "other" (postgresql://, mysql+pymysql://).
RUN --mount=type=secret,id=pip_ca \
    if [ -s /run/secrets/pip_ca ]; then export PIP_CERT=/run/secrets/pip_ca; fi; \
    python3 -m venv /opt/hub-spawner \
    && /opt/hub-spawner/bin/pip install --no-cache-dir \
        jupyterhub==6.1.1 \
        jupyterhub-idle-culler==2.0.0 \
        oauthenticator==17.4.0 \
        asyncssh==2.24.1 \
        traitlets==5.16.1 \
        psycopg2-binary==2.9.13 \
        pymysql==1.2.4 \
        /src/hub_spawner \
    && rm -rf /src/hub_spawner

USER 1000:1000
WORKDIR /srv/jupyterhub
ENV PYTHONUNBUFFERED=1
EXPOSE 8081 8765

ENTRYPOINT ["tini", "--"]
CMD ["jupyterhub", "-f", "/usr/local/etc/jupyterhub/jupyterhub_config.py"]
