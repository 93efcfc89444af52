"""Experiment tracking behind a small ``Tracker`` protocol; MLflow is one implementation.

Run layout: one parent run per study, found by its tag
``transferbench.study`` (each dvc stage is a separate process), and one nested child run
per (task, backbone, seed) tagged with task/backbone/family/weights/random_init/seed.
A child run is identified by ``transferbench.run_key`` (the Ray Train run name); a run
that is resumed after a crash reuses the run id persisted next to its Ray checkpoints,
so recovery never leaves a second run behind.

The driver creates runs and logs params/tags/dataset inputs with ``MlflowClient`` (no
global "active run" state); the rank-0 worker attaches to the child run with
``mlflow.start_run(run_id=..., nested=<an outer run is active>)``: under Optuna or any
caller that already has an active run, the child is pushed on top of it and popped on
close, never ending the caller's run.

The experiment carries ``mlflow.experimentKind`` = ``finetuning``, MLflow's own record of what kind of
experiment it is (MLflow UIs that read it open such an experiment on its training runs). MLflow 3.17's UI
opens an experiment by its "GenAI"/"Model training" workflow selector instead, GenAI by default: links to
the UI come from ``experiment_ui_url``, which names the training workflow. Every run the registry creates
gets a Markdown description (``mlflow.note.content``, the run's description in the UI).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

from transferbench.config import TrackingSettings

TRACKING_URI_ENV = "MLFLOW_TRACKING_URI"
STUDY_TAG = "transferbench.study"
KIND_TAG = "transferbench.kind"
RUN_KEY_TAG = "transferbench.run_key"
# MLflow's experiment-kind tag (a kind its UI knows: "finetuning" is a training kind, not GenAI)
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "finetuning"
NOTE_TAG = "mlflow.note.content"  # a run's description in the UI (Markdown)
# MLflow 3.17's UI opens an experiment by its sidebar workflow ("GenAI" or "Model training", the ``workflowType`` URL
# parameter, else the browser's last choice, else GenAI), not by mlflow.experimentKind: a link must name the workflow
UI_WORKFLOW_QUERY = "workflowType=machine_learning"
STUDY_DESCRIPTION = ("Study parent run: one child per (task, backbone, mode, seed); the rank table is added by the "
                     "report stage.")


class Tracker(Protocol):
    """What the training code may log; rank 0 only."""

    def log_params(self, params: Mapping[str, Any]) -> None: ...
    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None: ...
    def last_logged_step(self, key: str) -> int: ...
    def set_tags(self, tags: Mapping[str, Any]) -> None: ...
    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None: ...
    def log_model(self, model: Any, *, input_example: Any, output_example: Any) -> str | None: ...
    def log_serving_model(self, model: Any, served: Mapping[str, Any], example: bytes) -> str | None: ...
    def close(self, status: str = "FINISHED") -> None: ...


class NullTracker:
    """Records every call in memory; for tests and for ranks other than 0."""

    def __init__(self) -> None:
        self.params: dict[str, Any] = {}
        self.metrics: list[tuple[int | None, dict[str, float]]] = []
        self.tags: dict[str, Any] = {}
        self.artifacts: list[tuple[Path, str | None]] = []
        self.models: list[Any] = []
        self.closed_with: str | None = None

    def log_params(self, params: Mapping[str, Any]) -> None:
        self.params.update(params)

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        self.metrics.append((step, dict(metrics)))

    def last_logged_step(self, key: str) -> int:
        return max((step or 0 for step, values in self.metrics if key in values), default=0)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        self.tags.update(tags)

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        self.artifacts.append((Path(path), artifact_path))

    def log_model(self, model: Any, *, input_example: Any, output_example: Any) -> str | None:
        self.models.append(model)
        return None

    def log_serving_model(self, model: Any, served: Mapping[str, Any], example: bytes) -> str | None:
        self.models.append((model, dict(served)))
        return None

    def close(self, status: str = "FINISHED") -> None:
        self.closed_with = status


def experiment_ui_url(ui_url: str, experiment_id: str, run_id: str | None = None) -> str:
    """The MLflow UI page of the experiment's training runs (or of one run): ``<ui>/#/experiments/<id>/runs...``.

    The plain ``#/experiments/<id>`` (what the UI's experiment list links to) opens MLflow 3.17 on its GenAI traces
    overview in a browser that never chose "Model training"; the ``workflowType`` parameter opens the runs."""
    page = f"{ui_url.rstrip('/')}/#/experiments/{experiment_id}/runs"
    return f"{page}/{run_id}?{UI_WORKFLOW_QUERY}" if run_id else f"{page}?{UI_WORKFLOW_QUERY}"


def repo_path(path: str | Path) -> Path:
    """A store path from params, made absolute: relative to the DVC repository a stage runs for (``$DVC_ROOT``,
    which DVC sets for every stage; for a queued experiment, ``dvc exp run --queue``, it is the repository the
    experiment was queued in, not the temporary copy it runs in, so every experiment shares one store), else to
    the working directory."""
    path = Path(path)
    root = os.environ.get("DVC_ROOT")
    return (Path(root) / path if root and not path.is_absolute() else path).resolve()


def resolve_tracking_uri(configured: str) -> str:
    """$MLFLOW_TRACKING_URI, else params; a relative SQLite path is made absolute (``repo_path``: workers may chdir,
    and queued experiments run in temporary copies of the repository)."""
    uri = os.environ.get(TRACKING_URI_ENV) or configured
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri[len(prefix):].startswith("/"):
        uri = prefix + str(repo_path(uri[len(prefix):]))
    return uri


def store_lock(tracking_uri: str) -> contextlib.AbstractContextManager:
    """A lock that serialises find-or-create steps across the processes sharing a SQLite store.

    Concurrent stages (``transferbench repro --jobs N``, ``dvc queue start -j N``) each look up, then
    create, the experiment, the study's parent run and keyed runs; the first of them also creates the
    schema of an empty store. On SQLite (one machine, by SQLite's own rule) a file lock beside the
    database makes each step atomic; a server store has no shared file, so ``RunRegistry`` there keeps
    the earliest of any duplicates instead. Reentrant, so a locked step may call another.
    """
    prefix = "sqlite:///"
    if not tracking_uri.startswith(prefix):
        return contextlib.nullcontext()
    from filelock import FileLock

    return FileLock(tracking_uri[len(prefix):] + ".lock", timeout=300)


def experiment_artifact_location(tracking_uri: str, configured: str | Path) -> str | None:
    """Where a new experiment keeps its artifacts.

    Embedded store (``sqlite:``/file): ``tracking.artifact_location`` as an absolute file URI.
    Tracking server (``http(s):``/``databricks``): None, i.e. the server's default artifact root
    (``mlflow-artifacts:/`` when it runs with ``--serve-artifacts``), so every machine reads
    and writes artifacts through the server and none needs the server's disk.
    """
    if tracking_uri.split(":", 1)[0] in ("http", "https", "databricks"):
        return None
    return repo_path(configured).as_uri()


def _clean(params: Mapping[str, Any]) -> dict[str, str]:
    return {k: ("" if v is None else str(v))[:6000] for k, v in params.items()}


_KIND_LABELS = {"finetune": "Fine-tuning run", "retrieval": "Retrieval run (frozen features)",
                "sensitivity": "Sensitivity parent run", "sensitivity-study": "Sensitivity study",
                "sensitivity-trial": "Sensitivity trial"}


def describe_run(tags: Mapping[str, Any], *, kind: str) -> str:
    """A one-line Markdown description of a run from its tags (task, backbone, family, weights, mode, seed...)."""
    get = {k: str(v) for k, v in tags.items() if v is not None and str(v) != ""}.get
    if get("random_init") == "true":
        weights = "random-init"
    else:
        weights = get("weights_label") or get("weights")
    what = _KIND_LABELS.get(kind, f"{kind.capitalize()} run")
    parts = [f"task **{get('task')}**" if get("task") else None,
             f"backbone **{get('backbone')}**" if get("backbone") else None,
             f"family {get('family')}" if get("family") else None,
             f"weights {weights}" if weights else None,
             f"mode {get('mode')}" if get("mode") else None,
             f"seed {get('seed')}" if get("seed") else None,
             f"Optuna trial {get('optuna.trial')} ({get('label')})" if get("optuna.trial") else None]
    details = ", ".join(p for p in parts if p)
    return f"{what}: {details}." if details else f"{what}."


class MlflowTracker:
    """Attaches to an existing MLflow run (created by ``RunRegistry``) and logs into it."""

    def __init__(self, *, tracking_uri: str, run_id: str, system_metrics: bool = True) -> None:
        import mlflow

        self._mlflow = mlflow
        mlflow.set_tracking_uri(tracking_uri)
        self.run_id = run_id
        if system_metrics:  # sample every few seconds: short CPU runs still get system metrics
            mlflow.set_system_metrics_sampling_interval(2)
            mlflow.set_system_metrics_samples_before_logging(1)
        nested = mlflow.active_run() is not None
        self._run = mlflow.start_run(run_id=run_id, nested=nested, log_system_metrics=system_metrics)

    def log_params(self, params: Mapping[str, Any]) -> None:
        self._mlflow.log_params(_clean(params))

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        self._mlflow.log_metrics({k: float(v) for k, v in metrics.items() if v is not None}, step=step)

    def last_logged_step(self, key: str) -> int:
        """The highest step of metric ``key`` in the run (0: none), e.g. the last epoch a killed attempt logged."""
        history = self._mlflow.MlflowClient().get_metric_history(self.run_id, key)
        return max((m.step for m in history), default=0)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        self._mlflow.set_tags(_clean(tags))

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        self._mlflow.log_artifact(str(path), artifact_path=artifact_path)

    def log_model(self, model: Any, *, input_example: Any, output_example: Any) -> str | None:
        import timm
        import torch
        from mlflow.models import infer_signature

        signature = infer_signature(input_example, output_example)
        # mlflow.pytorch's pyfunc serves one output tensor: a multi-task model (a dict of outputs) keeps its signature
        # but no input example, which MLflow would try to serve; load it with mlflow.pytorch.load_model
        example = None if isinstance(output_example, dict) else input_example
        info = self._mlflow.pytorch.log_model(
            model, name="model", signature=signature, input_example=example, serialization_format="pickle",
            # explicit requirements: inferring them would import-scan the whole environment
            pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", f"timm=={timm.__version__}"])
        return info.model_uri

    def log_serving_model(self, model: Any, served: Mapping[str, Any], example: bytes) -> str | None:
        """The safe, image-serving pyfunc (``engine.serving``): what the registry registers."""
        from importlib.metadata import version

        from transferbench.engine.serving import log_serving_model

        requirements = [f"{name}=={version(name).split('+')[0]}"
                        for name in ("transferbench", "torch", "timm", "safetensors", "pillow", "mlflow")]
        return log_serving_model(model, served, example, requirements)

    def close(self, status: str = "FINISHED") -> None:
        active = self._mlflow.active_run()
        if active is not None and active.info.run_id == self.run_id:
            self._mlflow.end_run(status=status)


class RunRegistry:
    """Finds or creates the study's parent run and its child runs (driver side, client API)."""

    def __init__(self, *, tracking_uri: str, experiment: str, artifact_location: str | Path) -> None:
        from mlflow import MlflowClient
        from mlflow.exceptions import MlflowException

        self.tracking_uri = tracking_uri
        self._lock = store_lock(tracking_uri)
        with self._lock:  # the first touch creates a SQLite store's schema: one process at a time
            self.client = MlflowClient(tracking_uri)
            found = self.client.get_experiment_by_name(experiment)
            if found is None:
                try:
                    found_id = self.client.create_experiment(
                        experiment, artifact_location=experiment_artifact_location(tracking_uri, artifact_location),
                        tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
                except MlflowException as exc:  # a server store: another process created it first
                    if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                        raise
                    found = self.client.get_experiment_by_name(experiment)
                    found_id = found.experiment_id
                self.experiment_id = found_id
            else:
                self.experiment_id = found.experiment_id
            if found is not None and EXPERIMENT_KIND_TAG not in found.tags:  # made before the tag (or elsewhere)
                self.client.set_experiment_tag(self.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)

    @classmethod
    def from_settings(cls, tracking: TrackingSettings) -> RunRegistry:
        """The registry of ``params.yaml`` ``tracking`` (``$MLFLOW_TRACKING_URI`` overrides the store)."""
        return cls(tracking_uri=resolve_tracking_uri(tracking.tracking_uri), experiment=tracking.experiment,
                   artifact_location=tracking.artifact_location)

    def _search(self, filter_string: str) -> list[Any]:
        return self.client.search_runs([self.experiment_id], filter_string=filter_string,
                                       order_by=["attributes.start_time ASC"], max_results=50)

    def study_run(self, study: str) -> str:
        """The parent run of ``study`` (created on first use)."""
        query = f"tags.`{STUDY_TAG}` = '{study}' and tags.`{KIND_TAG}` = 'study'"
        with self._lock:
            runs = self._search(query)
            if runs:
                if NOTE_TAG not in runs[0].data.tags:  # a parent run made before descriptions
                    self.client.set_tag(runs[0].info.run_id, NOTE_TAG, STUDY_DESCRIPTION)
                return runs[0].info.run_id
            run = self.client.create_run(self.experiment_id, run_name=study,
                                         tags={STUDY_TAG: study, KIND_TAG: "study", NOTE_TAG: STUDY_DESCRIPTION})
            self.client.set_terminated(run.info.run_id, "FINISHED")
            return self._first(query, run.info.run_id)

    def _first(self, query: str, created: str) -> str:
        """The earliest run matching ``query``. Processes on a server store (no shared lock) may both create the
        run; each keeps the earliest and deletes its own if another came first, so one survives."""
        first = self._search(query)[0].info.run_id
        if first != created:
            self.client.delete_run(created)
        return first

    def child_run(self, *, study: str, run_key: str, run_name: str, tags: Mapping[str, Any],
                  reuse: str | None = None) -> tuple[str, bool]:
        """(run id, reused?): ``reuse`` (a persisted run id) if that run still exists, else a new child."""
        if reuse:
            try:
                run = self.client.get_run(reuse)
                if run.info.lifecycle_stage == "active":
                    return reuse, True
            except Exception:  # noqa: BLE001 -- a run deleted or from another store: start a new one
                pass
        parent = self.study_run(study)
        run = self.client.create_run(self.experiment_id, run_name=run_name, tags={
            NOTE_TAG: describe_run(tags, kind="finetune"), **_clean(tags), STUDY_TAG: study, KIND_TAG: "finetune",
            RUN_KEY_TAG: run_key, "mlflow.parentRunId": parent})
        return run.info.run_id, False

    def keyed_run(self, *, study: str, kind: str, run_key: str, run_name: str, parent: str | None = None,
                  tags: Mapping[str, Any] | None = None) -> str:
        """The run tagged (study, kind, run_key), created on first use (nested under ``parent``).

        Used by the sensitivity study for its parent, per-study and per-trial runs, so a rerun
        after a crash finds the runs it had created instead of adding new ones.
        """
        query = (f"tags.`{STUDY_TAG}` = '{study}' and tags.`{KIND_TAG}` = '{kind}' "
                 f"and tags.`{RUN_KEY_TAG}` = '{run_key}'")
        with self._lock:
            runs = self._search(query)
            if runs:
                return runs[0].info.run_id
            all_tags = {NOTE_TAG: describe_run(tags or {}, kind=kind), **_clean(tags or {}), STUDY_TAG: study,
                        KIND_TAG: kind, RUN_KEY_TAG: run_key}
            if parent:
                all_tags["mlflow.parentRunId"] = parent
            created = self.client.create_run(self.experiment_id, run_name=run_name, tags=all_tags).info.run_id
            return self._first(query, created)

    def describe(self, run_id: str, markdown: str) -> None:
        """Set the run's description (``mlflow.note.content``, Markdown), e.g. the study's rank table.

        MLflow caps a tag value at 8000 characters: a longer text is cut there, with a note that it was."""
        limit, cut = 8000, "\n\n*(description truncated: MLflow keeps 8000 characters)*"
        self.client.set_tag(run_id, NOTE_TAG, markdown if len(markdown) <= limit else markdown[:limit - len(cut)] + cut)

    def log_metrics(self, run_id: str, metrics: Mapping[str, float | None], step: int | None = None) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(run_id, metrics=[Metric(k, float(v), now, step or 0)
                                               for k, v in metrics.items() if v is not None])

    def log_params(self, run_id: str, params: Mapping[str, Any]) -> None:
        """Params the run does not have yet (a resumed run keeps its own); MLflow batches them."""
        from mlflow.entities import Param

        existing = self.client.get_run(run_id).data.params
        self.client.log_batch(run_id, params=[Param(k, v) for k, v in _clean(params).items() if k not in existing])

    def set_tags(self, run_id: str, tags: Mapping[str, Any]) -> None:
        from mlflow.entities import RunTag

        self.client.log_batch(run_id, tags=[RunTag(k, v) for k, v in _clean(tags).items()])

    def log_manifests(self, run_id: str, frames: Mapping[str, Any], sources: Mapping[str, Path],
                      *, task: str, digests: Mapping[str, str], targets: str | None) -> None:
        """Each split manifest as an MLflow dataset input (context = split name; ``targets``: its target column)."""
        import mlflow.data
        from mlflow.entities import DatasetInput, InputTag

        inputs = []
        for split, frame in frames.items():
            dataset = mlflow.data.from_pandas(frame, source=str(sources[split]), targets=targets,
                                              name=f"{task}/{split}", digest=digests[split][:8])
            inputs.append(DatasetInput(dataset._to_mlflow_entity(), tags=[InputTag("mlflow.data.context", split)]))
        # MLflow finds, then inserts, each dataset of the experiment: two stages of one task logging the same
        # manifests at once (transferbench repro --jobs) hit "UNIQUE constraint failed: datasets..." on the
        # insert. Serialised on SQLite; on a server store the loser's retry finds the winner's row.
        from mlflow.exceptions import MlflowException

        with self._lock:
            try:
                self.client.log_inputs(run_id, datasets=inputs)
            except MlflowException as exc:
                if "UNIQUE" not in str(exc) and "duplicate key" not in str(exc):
                    raise
                self.client.log_inputs(run_id, datasets=inputs)
