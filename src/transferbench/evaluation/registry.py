"""Best fine-tuned checkpoints into the MLflow Model Registry, with champion and per-family aliases.

Layout: one registered model per (study, evaluation), named ``<study>.<task>`` for full fine-tuning
and ``<study>.<task>.linear_probe`` for linear evaluation; one version per backbone it ran (its best
seed). A multitask task is one model, ``<study>.<multitask task>``, whose checkpoints are chosen by
the multitask task's own selection metric (its summed val loss, lower is better), not per
component. Retrieval evaluations train nothing and register nothing. Aliases on each registered model:

- ``champion``: the best backbone on the task;
- ``best-convnet`` / ``best-transformer``: the best backbone of each family (``best-<family>``).

"Best" is always judged on the validation metric (``val_<metric>``, direction-aware): the test
split stays untouched by every choice. Ties go to the lower seed, then the backbone name, so
the choice is deterministic.

Idempotent: a version is identified by (backbone, source run id); re-registering unchanged
results finds the existing version and creates none. A new run (e.g. a better result) becomes a
new version and the aliases move to it; older versions stay, as history, with their tags.

What is registered: the run's ``serving`` model (``engine.serving``), an MLflow pyfunc that takes images
(encoded bytes, base64 in JSON) and returns the task's answer (class name and probabilities, age, mask,
depth map), in a safe format: a safetensors state dict plus the installed ``transferbench``'s code
(MLflow "models from code"), never a pickle. The raw ``mlflow.pytorch`` module the run logs as ``model``
(pickled) stays in the run for users who want it; the version's ``module_uri`` tag points at it.

Model URI convention (MLflow 3): logging a model inside run ``mlflow_run_id`` creates a LoggedModel
(id ``m-...``) whose source run is that run. The version's source is ``models:/<logged-model-id>``, found
by its name and run (what ``mlflow.register_model("runs:/<run>/serving", ...)`` does).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException

from transferbench.errors import TransferbenchError
from transferbench.engine.serving import SERVING_ARTIFACT
from transferbench.engine.tasks import MetricSpec
from transferbench.evaluation.results import FinetuneResult

MODULE_ARTIFACT = "model"  # the raw mlflow.pytorch module (pickled), not registered
CHAMPION = "champion"
# Provenance keys copied from the metrics JSON into version tags when present.
PROVENANCE_KEYS = ("model", "weights", "random_init", "data_version", "git_commit", "best_epoch", "epochs_run")


class RegistryError(TransferbenchError):
    """The run or model a result points at cannot be found in MLflow."""


def registered_model_name(study: str, evaluation: str) -> str:
    """``<study>.<task>`` or ``<study>.<task>.<mode>`` (evaluation ids use ``:``, registry names do not)."""
    return f"{study}.{evaluation.replace(':', '.')}"


def family_alias(family: str) -> str:
    return f"best-{family}"


Metrics = Mapping[str, MetricSpec]  # evaluation id -> its selection metric and direction


def _val_key(result: FinetuneResult, metrics: Metrics) -> tuple[float, int, str]:
    """Sort key: best validation score first (in the task's direction), then lower seed, then backbone name."""
    score = -result.val_score if metrics[result.evaluation].higher_is_better else result.val_score
    return score, result.seed, result.backbone


def select_checkpoints(results: Sequence[FinetuneResult], metrics: Metrics) -> dict[tuple[str, str], FinetuneResult]:
    """The best seed of every (task, backbone), by validation metric."""
    best: dict[tuple[str, str], FinetuneResult] = {}
    for result in sorted(results, key=lambda r: _val_key(r, metrics)):
        best.setdefault((result.evaluation, result.backbone), result)
    return best


def alias_targets(selected: Sequence[FinetuneResult], metrics: Metrics) -> dict[str, FinetuneResult]:
    """``champion`` and ``best-<family>`` for one task's selected checkpoints."""
    ranked = sorted(selected, key=lambda r: _val_key(r, metrics))
    targets = {CHAMPION: ranked[0]} if ranked else {}
    for result in ranked:
        targets.setdefault(family_alias(result.family), result)
    return targets


def version_tags(result: FinetuneResult, *, study: str, seeds: Sequence[FinetuneResult],
                 git_commit: str | None) -> dict[str, str]:
    """Tags of a registered version: what it is, how it scored, and where it came from."""
    tags = {
        "study": study, "task": result.task, "mode": result.mode, "backbone": result.backbone, "family": result.family,
        "weights": result.weights, "seed": str(result.seed), "mlflow_run_id": result.mlflow_run_id,
        "model_uri": result.model_uri, "selection_metric": result.metric,
        "selected_by": f"best val_{result.metric} over seeds {sorted(r.seed for r in seeds)}",
        "data_version": str(result.raw.get("data_version") or "unknown"),
        "git_commit": str(result.raw.get("git_commit") or git_commit or "unknown"),
        "metrics_file": str(result.path),
    }
    for key in PROVENANCE_KEYS:
        if key in result.raw and key not in tags:
            tags[key] = str(result.raw[key])
    for split in ("val", "test"):
        for name, value in result.scores(split).items():
            tags[f"{split}_{name}"] = repr(value)
    return tags


def _model_source(client: MlflowClient, run_id: str) -> tuple[str, str]:
    """(source URI, logged-model id) of the served model (``serving``) logged in ``run_id``."""
    try:
        run = client.get_run(run_id)
    except MlflowException as exc:
        raise RegistryError(f"MLflow run {run_id} not found in the tracking store: {exc.message}") from None
    models, token = [], None
    while True:
        page = client.search_logged_models(experiment_ids=[run.info.experiment_id],
                                           filter_string=f"name = '{SERVING_ARTIFACT}'", page_token=token)
        models += [m for m in page if m.source_run_id == run_id]
        token = page.token
        if not token:
            break
    if not models:
        raise RegistryError(f"MLflow run {run_id} logged no served model named '{SERVING_ARTIFACT}' (the safe, "
                            f"image-serving pyfunc of engine.serving): it ran with tracking.log_model off or "
                            f"before served models existed; rerun its fine-tune")
    model = max(models, key=lambda m: m.creation_timestamp)
    return f"models:/{model.model_id}", model.model_id


def _ensure_registered_model(client: MlflowClient, name: str, tags: Mapping[str, str]) -> None:
    try:
        client.get_registered_model(name)
    except MlflowException:
        try:
            client.create_registered_model(
                name, tags=dict(tags), description="Best fine-tuned checkpoint per backbone (transferbench register)")
        except MlflowException as exc:  # another register process created it first
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise


def _versions_of(client: MlflowClient, name: str, result: FinetuneResult) -> list[ModelVersion]:
    """The versions of ``name`` registered from ``result``'s run, oldest first."""
    found = [v for v in client.search_model_versions(f"name = '{name}'")
             if v.tags.get("backbone") == result.backbone and v.run_id == result.mlflow_run_id]
    return sorted(found, key=lambda v: int(v.version))


def _existing_version(client: MlflowClient, name: str, result: FinetuneResult) -> ModelVersion | None:
    found = _versions_of(client, name, result)
    return found[0] if found else None


def _keep_first(client: MlflowClient, name: str, result: FinetuneResult, created: ModelVersion) -> ModelVersion:
    """The oldest version of ``result``'s run: two register processes on a server store (no shared lock) may both
    have created one; the later deletes its own, so both point the aliases at the same version."""
    first = _existing_version(client, name, result)
    if first is None or first.version == created.version:
        return created
    client.delete_model_version(name, created.version)
    return first


def register_study(client: MlflowClient, results: Sequence[FinetuneResult], *, metrics: Metrics, study: str,
                   git_commit: str | None = None) -> list[dict[str, Any]]:
    """Register every (task, backbone)'s best checkpoint and point the aliases; returns one row per version."""
    selected = select_checkpoints(results, metrics)
    rows = []
    for task in dict.fromkeys(r.evaluation for r in results):
        name = registered_model_name(study, task)
        task_selected = [r for (t, _), r in selected.items() if t == task]
        _ensure_registered_model(client, name, {"study": study, "task": task_selected[0].task,
                                                "mode": task_selected[0].mode,
                                                "selection_metric": task_selected[0].metric})
        versions: dict[str, ModelVersion] = {}
        for result in task_selected:
            version = _existing_version(client, name, result)
            created = version is None
            if created:
                source, model_id = _model_source(client, result.mlflow_run_id)
                seeds = [r for r in results if (r.evaluation, r.backbone) == (task, result.backbone)]
                tags = version_tags(result, study=study, seeds=seeds, git_commit=git_commit)
                tags["logged_model_id"] = model_id
                tags["module_uri"] = f"runs:/{result.mlflow_run_id}/{MODULE_ARTIFACT}"
                version = client.create_model_version(
                    name, source, run_id=result.mlflow_run_id, model_id=model_id, tags=tags,
                    description=f"{result.backbone} ({result.family}) on {result.task} ({result.mode}), "
                                f"seed {result.seed}")
                version = _keep_first(client, name, result, version)
            versions[result.backbone] = version
            rows.append({"registered_model": name, "version": str(version.version), "task": task,
                         "mode": result.mode,
                         "backbone": result.backbone, "family": result.family, "seed": result.seed,
                         "mlflow_run_id": result.mlflow_run_id, "created": created, "aliases": []})
        aliases = client.get_registered_model(name).aliases
        for alias, result in alias_targets(task_selected, metrics).items():
            version = str(versions[result.backbone].version)
            if aliases.get(alias) != version:
                client.set_registered_model_alias(name, alias, version)
            next(r for r in rows if r["registered_model"] == name and r["backbone"] == result.backbone)[
                "aliases"].append(alias)
    return rows
