"""One (task, backbone, seed) fine-tune, end to end: its MLflow run, the Ray Train fit, its outputs.

Outputs, read by ``dvc metrics show`` / ``dvc plots show`` and by the rank table
(``transferbench.evaluation.results``); the key names are stable:

``metrics/finetune/<task>/<backbone>/<mode>/seed<S>.json`` -- the run's numbers (``engine.run_files``):
  selection   val_score, test_score (tasks.<task>.metric on val/test); baseline_score: the task kind's
              trivial baseline on test (e.g. predicting the training mean), null where the kind has none
  metrics     val_<m> and test_<m> for every metric m of the task kind (null where undefined),
              computed with the best epoch's weights
  training    best_epoch, epochs_run, best_val_loss, train_seconds
``metrics/finetune.runs/<task>/<backbone>/<mode>/seed<S>.json`` -- the run's record, who and what made them:
  identity    task, task_kind, backbone, model (timm name), family, weights (hub |
              file:<path> | none), weights_label (hub-pretrained | file-pretrained | random-init),
              random_init (bool), seed, study, mode (full | linear_probe), img_size, num_workers,
              hyperparameters (paper | tuned) and the lr, warmup_iters, warmup_lr actually used
  selection   metric (tasks.<task>.metric); baseline (what the trivial baseline is)
  training    stop_reason (early_stop | max_epochs | hook), resumed_at_epochs (non-empty when the run
              recovered from a checkpoint), world_size and ray_nodes, device, precision, channels_last
              and threads as rank 0 trained
  provenance  mlflow_run_id, mlflow_parent_run_id, data_version (hash of the split manifests),
              git_commit, ray_run_name
``plots/finetune/<task>/<backbone>/<mode>/seed<S>-<weights_label>.csv`` -- per epoch: epoch, train_loss,
  val_loss, the kind's training statistic on train and val (train_accuracy, val_accuracy), lr. The name is
  ``dvc plots show``'s title of the curve: task, backbone, mode, seed and whether the backbone was random-init.

A run killed part-way (worker or whole process) is resumed by running the same command: the Ray
run name is derived from the run's full configuration, and its MLflow run id is persisted next
to the checkpoints, so the same MLflow run continues. A run that completed with the same
configuration is not trained again (its outputs are rewritten from the run directory) unless
``fresh``, so a stage of several seeds that failed at its last seed reruns only that seed.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transferbench.atomic import write_text
from transferbench.config import BackboneSettings, FinetuneSettings, RaySettings, TaskSettings, TrackingSettings
from transferbench.engine.curves import curve_path, write_curve_csv
from transferbench.engine.inputs import TaskInputs
from transferbench.engine.ray_driver import fit_on_ray
from transferbench.engine.run_files import write_result
from transferbench.engine.spec import FINAL_FILE, HARDWARE_KEYS, WorkerSpec
from transferbench.engine.tasks import MetricSpec
from transferbench.engine.tracking import RunRegistry
from transferbench.models import WeightsSource
from transferbench.paths import SPLITS
from transferbench.provenance import git_commit

RUN_ID_FILE = "mlflow_run.json"
COMPLETED_FILE = "COMPLETED"
RESULT_FILE = "result.json"  # the metrics JSON of a completed run, kept beside its checkpoints


@dataclass(frozen=True)
class Job:
    """What every seed of one (task, backbone) shares: its names and setting sections."""

    study: str
    task: str
    task_settings: TaskSettings
    backbone_name: str
    backbone: BackboneSettings
    protocol: FinetuneSettings
    ray: RaySettings
    tracking: TrackingSettings


def run_seed(job: Job, inputs: TaskInputs, registry: RunRegistry, *, seed: int, metrics_dir: str | Path,
             plots_dir: str | Path, fresh: bool = False) -> dict[str, Any]:
    """Fine-tune ``job`` with ``seed``; returns (and writes) the metrics JSON."""
    started = time.perf_counter()
    entry, protocol, kind = job.backbone, job.protocol, inputs.kind
    weights = WeightsSource.parse(entry.weights)
    data_version = inputs.manifests.data_version()
    identity = {"study": job.study, "task": job.task, "backbone": job.backbone_name, "seed": seed,
                "backbone_settings": entry.model_dump(), "finetune": protocol.model_dump(),
                "data_version": data_version, "img_size": inputs.img_size}
    if weights.kind == "file" and weights.path.is_file():  # new weights under the same name are a new run
        with weights.path.open("rb") as handle:
            identity["weights_sha256"] = hashlib.file_digest(handle, "sha256").hexdigest()
    run_key = hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:12]
    run_name = f"{job.task}.{job.backbone_name}.{protocol.mode}.seed{seed}.{run_key}"
    storage = Path(job.ray.storage_path).resolve()
    run_dir = storage / run_name
    if (run_dir / COMPLETED_FILE).exists():
        if not fresh and (done := _completed_result(run_dir, registry)) is not None:
            _write_outputs(done, json.loads((run_dir / FINAL_FILE).read_text())["history"], metrics_dir, plots_dir,
                           statistic=kind.train_statistic)
            return done
        shutil.rmtree(run_dir)  # an identical run to train again: start afresh, in a new MLflow run
    run_dir.mkdir(parents=True, exist_ok=True)

    persisted = run_dir / RUN_ID_FILE
    previous = json.loads(persisted.read_text())["run_id"] if persisted.exists() else None
    commit = git_commit()
    tags = {"task": job.task, "task_kind": kind.name, "backbone": job.backbone_name, "model": entry.model,
            "family": entry.family, "weights": entry.weights, "weights_label": weights.label,
            "random_init": str(weights.random_init).lower(), "seed": seed, "mode": protocol.mode,
            "mlflow.source.git.commit": commit, "data_version": data_version,
            "transferbench.hyperparameters": protocol.hyperparameters}
    run_id, reused = registry.child_run(study=job.study, run_key=run_name, tags=tags, reuse=previous,
                                        run_name=f"{job.task}/{job.backbone_name}/{protocol.mode}/seed{seed}")
    write_text(persisted, json.dumps({"run_id": run_id}))
    parent_id = registry.study_run(job.study)
    manifests = inputs.manifests
    frames = {s: manifests.frame(s) for s in SPLITS}
    registry.log_params(run_id, {
        **{f"finetune.{k}": v for k, v in protocol.model_dump().items()},
        **{f"ray.{k}": v for k, v in job.ray.model_dump().items()},
        "task": job.task, "task.kind": kind.name, "task.metric": job.task_settings.metric,
        "backbone": job.backbone_name, "model": entry.model, "family": entry.family, "weights": entry.weights,
        "random_init": weights.random_init, "seed": seed, "img_size": inputs.img_size,
        "cache_side": inputs.cache_side, "input_mean": inputs.spec.mean, "input_std": inputs.spec.std,
        **kind.describe(), "data_version": data_version, **{f"data.{s}_md5": manifests.md5(s) for s in SPLITS},
        **{f"data.{s}_rows": len(frames[s]) for s in SPLITS}, "git_commit": commit, "ray_run_name": run_name})
    registry.set_tags(run_id, {"transferbench.attempt_reused_run": str(reused).lower()})
    if not reused:
        registry.log_manifests(run_id, frames, manifests.paths, task=job.task, targets=kind.target_column,
                               digests={s: manifests.md5(s) for s in SPLITS})

    spec = WorkerSpec(
        task=job.task, backbone_name=job.backbone_name, backbone=entry, protocol=protocol, kind=kind, seed=seed,
        task_settings=job.task_settings, summary=dict(manifests.summary),
        img_size=inputs.img_size, input_spec=inputs.spec, cache_files={s: str(p) for s, p in inputs.caches.items()},
        filenames={s: tuple(str(f) for f in frames[s]["filename"]) for s in SPLITS}, run_dir=str(run_dir),
        ray=job.ray, tracking=job.tracking, tracking_uri=registry.tracking_uri, mlflow_run_id=run_id)
    if not job.ray.local_mode:  # local mode trains in this process: no cluster to start or join
        from transferbench.engine.cluster import connect

        connect(job.ray.address)
    try:
        final = fit_on_ray(spec, run_name=run_name, storage_path=str(storage))
    except Exception:
        registry.client.set_terminated(run_id, "FAILED")
        raise

    metric = job.task_settings.metric
    result: dict[str, Any] = {
        "task": job.task, "task_kind": kind.name, "backbone": job.backbone_name, "model": entry.model,
        "family": entry.family, "weights": entry.weights, "weights_label": weights.label,
        "random_init": weights.random_init, "seed": seed, "study": job.study, "mode": protocol.mode,
        "hyperparameters": protocol.hyperparameters, "lr": protocol.lr, "warmup_iters": protocol.warmup_iters,
        "warmup_lr": protocol.warmup_lr, "img_size": inputs.img_size, "num_workers": job.ray.num_workers,
        "metric": metric, "val_score": final.get(f"val_{metric}"), "test_score": final.get(f"test_{metric}"),
        **_trivial_baseline(inputs, frames),
        **{f"{split}_{m.name}": final.get(f"{split}_{m.name}") for split in ("val", "test")
           for m in (*kind.metrics, MetricSpec("loss", higher_is_better=False))},
        **{k: final[k] for k in ("best_epoch", "epochs_run", "best_val_loss", "stop_reason", "resumed_at_epochs")},
        "world_size": final["world_size"], "ray_nodes": len(set(final["worker_nodes"])),
        **{k: final.get(k) for k in HARDWARE_KEYS},  # a run completed before a key was added lacks it
        "train_seconds": round(time.perf_counter() - started, 2),
        "mlflow_run_id": run_id, "mlflow_parent_run_id": parent_id, "data_version": data_version,
        "git_commit": commit, "ray_run_name": run_name,
    }
    result.update(kind.result_fields(final))
    _write_outputs(result, final["history"], metrics_dir, plots_dir, statistic=kind.train_statistic)
    registry.log_metrics(run_id, {"train_seconds": result["train_seconds"]})
    write_text(run_dir / RESULT_FILE, json.dumps(result, indent=2) + "\n")
    write_text(run_dir / COMPLETED_FILE, run_id + "\n")
    return result


def _write_outputs(result: dict[str, Any], history: list[dict[str, float]], metrics_dir: str | Path,
                   plots_dir: str | Path, *, statistic: str) -> None:
    write_result(metrics_dir, result)
    write_curve_csv(history, curve_path(plots_dir, result["task"], result["backbone"], result["seed"], result["mode"],
                                        result["weights_label"]), statistic=statistic)


def _cached_targets(inputs: TaskInputs, split: str) -> Any:
    """A split's targets as the engine evaluates them: from its cache, per-pixel maps centre-cropped to the input."""
    import torch
    from torchvision.transforms.v2 import functional as TF

    def crop(t: torch.Tensor) -> Any:
        return (TF.center_crop(t, [inputs.img_size] * 2) if t.ndim >= 3 else t).numpy()

    targets = torch.load(inputs.caches[split], weights_only=True)["targets"]
    return {k: crop(v) for k, v in targets.items()} if isinstance(targets, dict) else crop(targets)


def _trivial_baseline(inputs: TaskInputs, frames: dict[str, Any]) -> dict[str, Any]:
    """``baseline`` (what it is) and ``baseline_score`` (its test metric), from the kind's trivial predictor."""
    kind = inputs.kind
    baseline = kind.trivial_baseline(_cached_targets(inputs, "train"), _cached_targets(inputs, "test"))
    return {"baseline": None, "baseline_score": None} if baseline is None else \
        {"baseline": baseline[0], "baseline_score": baseline[1]}


def _completed_result(run_dir: Path, registry: RunRegistry) -> dict[str, Any] | None:
    """The result of the completed run in ``run_dir``, if its MLflow run is still there and FINISHED."""
    try:
        result = json.loads((run_dir / RESULT_FILE).read_text())
        run = registry.client.get_run(result["mlflow_run_id"])
    except Exception:  # noqa: BLE001 -- no result file, or a run deleted or from another store: train again
        return None
    if run.info.lifecycle_stage != "active" or run.info.status != "FINISHED":
        return None
    return result
