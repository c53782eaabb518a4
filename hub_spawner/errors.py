"""Errors a user or an admin may see: each message says what happened and what to do.

They are ``tornado.web.HTTPError`` subclasses so that JupyterHub logs them as one line (no
traceback) and shows ``jupyterhub_message`` on the spawn page and the progress stream.
"""

from __future__ import annotations

from tornado import web


class SpawnError(web.HTTPError):
    """A spawn failed for a reason we can explain. ``str()`` is the message for people."""

    def __init__(self, message: str, status_code: int = 500) -> None:
        super().__init__(status_code, log_message=message.replace("%", "%%"))
        self.message = message
        self.jupyterhub_message = message

    def __str__(self) -> str:
        return self.message


class ClusterUnreachable(SpawnError):
    """The login node could not be reached, refused us, or a command on it could not finish."""


class JobRejected(SpawnError):
    """The scheduler refused the job script."""


class JobEndedEarly(SpawnError):
    """The job ended before its server was ready."""


class BadReadyLine(SpawnError):
    """The job reported an address we will not connect to."""


class BadOptions(SpawnError):
    """The user asked for resources that are not valid here."""

    def __init__(self, message: str) -> None:
        super().__init__(message, status_code=400)


class NotReadyInTime(SpawnError):
    """The server was not ready within ``start_timeout``; the job is cancelled."""
