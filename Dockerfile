# The hub image of the Helm chart (helm/hub-spawner): JupyterHub + hub_spawner. The same image
# runs the tunnel service (python -m hub_spawner.tunnels, which runs OpenSSH's ssh) and the
# pods' keys-copy containers (sh, cp, cmp).
#
#   docker build -t ghcr.io/hub-spawner/hub-spawner:0.1.0 .
#
# Not built or run by the test suite: the development machines have no container engine. The
# chart's tests (tests/test_helm_chart.py) check that its pins match tests/lab/requirements.txt,
# the versions the lab tests.
FROM python:3.11-slim

# openssh-client: the tunnel service's ssh. tini: PID 1 that reaps the ssh processes.
RUN apt-get update \
    && apt-get install -y --no-install-recommends openssh-client tini \
    && rm -rf /var/lib/apt/lists/*

# uid/gid 1000, as the chart's securityContext; OpenSSH needs the uid to have a passwd entry.
RUN groupadd --gid 1000 jupyterhub \
    && useradd --uid 1000 --gid 1000 --create-home --home-dir /home/jupyterhub \
        --shell /usr/sbin/nologin jupyterhub \
    && install -d -m 0700 -o 1000 -g 1000 /home/jupyterhub/.ssh \
    && install -d -m 0755 -o 1000 -g 1000 /srv/jupyterhub /srv/tunnels /usr/local/etc/jupyterhub

COPY pyproject.toml README.md /src/hub_spawner/
COPY hub_spawner /src/hub_spawner/hub_spawner
# psycopg2-binary / pymysql: for hub.db.type "other" (postgresql://, mysql+pymysql://).
RUN pip install --no-cache-dir \
        jupyterhub==6.1.1 \
        asyncssh==2.24.1 \
        traitlets==5.16.1 \
        oauthenticator==17.4.0 \
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
