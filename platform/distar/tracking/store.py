"""Where runs and models go, and how a process talks to it.

The embedded default needs no server: a sqlite store (`mlflow.db`) and an artifact folder
(`mlartifacts/`) in the working directory. `tracking.mlflow_uri` in the config, else
MLFLOW_TRACKING_URI, names a tracking server (or any other MLflow store) instead.

`resolve` only reads (the config's URI and the environment) and returns a `Store`. `connect` is
the one place that points this process's MLflow at a store: its tracking and registry URIs
(MLflow's fluent API logs and loads models through them) and the store's credentials (MLflow's
REST client reads them from the environment). It leaves the URIs child processes inherit as
they were. Clients are made with the store's URI named, never MLflow's last one.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote

from distar.errors import UserError

CREDENTIALS = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN")
URI_VARIABLES = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")
EMBEDDED_DB, EMBEDDED_ARTIFACTS = "mlflow.db", "mlartifacts"

# Userinfo in URIs (scheme://user:password@host) and credential-like query parameters.
_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*:")  # a URI, `file:/x` as much as `http://x`
_USERINFO = re.compile(r"(?<=://)[^/@\s]+@")
_QUERY_SECRET = re.compile(r"(?i)([?&](?:[\w.-]*(?:token|secret|password|passwd|signature|credential|key)[\w.-]*)=)[^&\s]*")
SECRET_NAME = re.compile(r"(?i)(token|secret|password|passwd|credential|api_?key|access_?key)")


def redact(text: str) -> str:
    """`text` with credentials in URIs replaced by ***; safe to log, tag or print."""
    return _QUERY_SECRET.sub(r"\1***", _USERINFO.sub("***@", text))


def redacted(key: object, value: object) -> object:
    """A config leaf as written or logged: *** under a secret-like name, credentials in URIs redacted."""
    if SECRET_NAME.search(str(key)) and value:
        return "***"
    return redact(value) if isinstance(value, str) else value


def safe_tree(tree: object, key: object = "") -> object:
    """A config tree (model_dump) with every leaf redacted: what is written, printed or handed on."""
    if isinstance(tree, dict):
        return {k: safe_tree(v, k) for k, v in tree.items()}
    if isinstance(tree, list):
        return [safe_tree(v, key) for v in tree]
    return redacted(key, tree)


@dataclass(frozen=True)
class Store:
    """An MLflow store: a URI safe to print and link, and the credentials it takes (never printed)."""

    uri: str
    credentials: dict[str, str] = field(default_factory=dict, repr=False)

    def client(self):
        """A client of this store for runs and the registry alike (never the registry MLflow last used)."""
        import mlflow

        return mlflow.MlflowClient(self.uri, registry_uri=self.uri)


def resolve(configured: str | None = None) -> Store:
    """The config's URI, else MLFLOW_TRACKING_URI, else the embedded store in the working
    directory. Local stores are made absolute: trainer workers run in other directories.

    Credentials written into an http(s) URI leave it (it then appears in links and logs as it is)
    and travel as MLflow's own MLFLOW_TRACKING_USERNAME/PASSWORD; otherwise those variables of
    this environment are the store's credentials."""
    uri = configured or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path(EMBEDDED_DB).resolve()}"
    credentials = {k: os.environ[k] for k in CREDENTIALS if k in os.environ}
    found = _USERINFO.search(uri) if uri.startswith(("http://", "https://")) else None
    if found:
        user, _, password = found.group(0)[:-1].partition(":")
        credentials = {"MLFLOW_TRACKING_USERNAME": unquote(user), "MLFLOW_TRACKING_PASSWORD": unquote(password)}
        uri = uri[: found.start()] + uri[found.end() :]
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        uri = f"sqlite:///{Path(uri.removeprefix('sqlite:///')).resolve()}"
    elif not _SCHEME.match(uri):  # a plain folder: MLflow's file store
        uri = Path(uri).resolve().as_uri()
    return Store(uri, credentials)


def connect(store: Store, experiment: str | None = None) -> str | None:
    """Point this process's MLflow at `store`, check it answers, and return the id of `experiment`
    (created if new; in the embedded store with its artifacts beside the database)."""
    import mlflow
    from mlflow.exceptions import MlflowException

    uri = store.uri
    if uri.startswith(("http://", "https://")):
        check_server(uri)
    os.environ.update(store.credentials)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # a bar per copied folder is noise in job logs
    inherited = {name: os.environ.get(name) for name in URI_VARIABLES}
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    for name, value in inherited.items():  # MLflow exports the URIs to child processes too; ours choose their own store
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
    if experiment is None:
        return None
    try:
        found = mlflow.get_experiment_by_name(experiment)
        if found is not None:
            return found.experiment_id
        location = None
        if uri.startswith("sqlite:///"):  # else MLflow would put artifacts under the *current* directory
            location = (Path(uri.removeprefix("sqlite:///")).parent / EMBEDDED_ARTIFACTS).as_uri()
        return mlflow.create_experiment(experiment, artifact_location=location)
    except MlflowException as e:
        raise UserError(f"tracking: MLflow store {redact(uri)} refused experiment {experiment!r}: {redact(str(e).splitlines()[0])}") from None


def check_server(uri: str) -> None:
    """A wrong server address fails here in seconds, not after MLflow's minutes of retries."""
    import requests

    try:
        requests.get(uri.rstrip("/") + "/health", timeout=10).raise_for_status()
    except requests.RequestException as e:
        raise UserError(f"tracking.mlflow_uri: no MLflow server answers at {redact(uri)} ({type(e).__name__})") from None
