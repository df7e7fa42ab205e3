"""Fetching a teacher from an MLflow tracking store: an artifact URI (``runs:/<id>/artifact``),
a registered model version (``models:/NAME/VERSION``, ``models:/NAME@ALIAS``: the MLflow model
of a logged model, or an artifact directory it was registered from) or a logged model
(``models:/<model_id>``), downloaded once per process to a local directory.
``tracking.pyfunc.load_mlflow_model`` reads a downloaded MLflow model."""

from __future__ import annotations

from pathlib import Path

from ..compress.distill.teacher import TeacherError
from .config import TrackingConfig
from .tracker import tracking_uri

# MLflow downloads, so that validation and the run fetch a remote teacher only once per process
_DOWNLOADED: dict[tuple[str, str], Path] = {}


def download_teacher(uri: str, tracking: TrackingConfig, output_dir: Path,
                     what: str = "teacher") -> Path:
    """An MLflow artifact URI fetched to a local directory, using the pipeline's tracking URI
    (``tracking`` and its ``output_dir``); ``what`` names it in messages."""
    store = tracking_uri(tracking, output_dir)
    key = (uri, store)
    local_db = Path(store.removeprefix("sqlite:///")) if store.startswith("sqlite:///") else None
    if local_db is not None and not local_db.is_file():
        # asking mlflow would create an empty database there
        raise TeacherError(f"cannot download {what} {uri!r}: no MLflow store at {local_db} (set "
                           "tracking.uri or MLFLOW_TRACKING_URI to the store that holds the run)")
    if key not in _DOWNLOADED:
        import mlflow.artifacts  # lazy: importing mlflow takes seconds

        try:
            source = _registered_source(uri, store, what) if uri.startswith("models:/") else uri
            _DOWNLOADED[key] = Path(mlflow.artifacts.download_artifacts(artifact_uri=source,
                                                                        tracking_uri=store))
        except TeacherError:
            raise
        except Exception as exc:  # mlflow raises many types for a bad URI, run or server
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise TeacherError(f"cannot download {what} {uri!r} from tracking store {store}: "
                               f"{first}") from None
    return _DOWNLOADED[key]


def _registered_source(uri: str, store: str, what: str = "teacher") -> str:
    """Where the registered model version ``models:/NAME/VERSION`` (or ``@ALIAS``) of the
    tracking store ``store`` keeps its files. mlflow resolves a models:/ URI in the process's
    registry, not in the store passed to download_artifacts: hence this lookup."""
    from mlflow.tracking import MlflowClient  # lazy: importing mlflow takes seconds

    client = MlflowClient(tracking_uri=store, registry_uri=store)
    ref = uri.removeprefix("models:/").strip("/")
    name, _, version = ref.partition("/")
    if not version and "@" in name:
        name, alias = name.split("@", 1)
        found = client.get_model_version_by_alias(name, alias)
    elif version.isdigit():
        found = client.get_model_version(name, version)
    elif not version and ref.startswith("m-"):  # a logged model's id: models:/<model_id>
        return client.get_logged_model(ref).artifact_location
    else:
        raise TeacherError(f"{what} {uri!r}: expected models:/NAME/VERSION, "
                           "models:/NAME@ALIAS (a registered model version) or models:/<model id>")
    model_id = getattr(found, "model_id", None) or _model_id(found.source)
    if model_id:  # a version of a logged model: the MLflow model directory it holds
        return client.get_logged_model(model_id).artifact_location
    return found.source


def _model_id(source: str | None) -> str | None:
    """The logged model id of a version's source ``models:/m-...``; None for other sources."""
    ref = (source or "").removeprefix("models:/")
    return ref if ref != source and ref.startswith("m-") and "/" not in ref else None
