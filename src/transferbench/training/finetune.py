"""``transferbench finetune``: one (task, backbone, seed) of the study, end to end.

Builds the pieces in order: manifests -> image cache -> model check (weights source) ->
MLflow parent/child run -> Ray Train fit -> metrics JSON + learning-curve CSV.

Outputs, read by ``dvc metrics show`` / ``dvc plots show`` and by the rank table
(``transferbench.evaluation.results``); the key names are stable:

``metrics/finetune/<task>/<backbone>/seed<S>.json`` -- one flat object:
  identity    task, backbone, model (timm name), family, weights (hub | file:<path> | none),
              weights_label (hub-pretrained | file-pretrained | random-init), random_init (bool),
              seed, study, mode (full | linear_probe), img_size, num_workers,
              hyperparameters (paper | tuned: finetune.hyperparameters) and the lr, warmup_iters,
              warmup_lr actually used
  selection   metric (tasks.<task>.metric), val_score, test_score (that metric on val/test)
  metrics     val_<m> and test_<m> for m in accuracy, balanced_accuracy, macro_f1, auroc
              (auroc: binary tasks only, null otherwise), computed with the best-val-loss weights
  training    best_epoch, epochs_run, best_val_loss, stop_reason (early_stop | max_epochs | hook),
              resumed_at_epochs (list; non-empty when the run recovered from a checkpoint),
              world_size and ray_nodes (workers and distinct Ray nodes of the final attempt),
              device (cpu or the GPU's name), precision (bf16-autocast | fp32) and channels_last,
              as rank 0 trained (``ray.use_gpu`` / ``mixed_precision`` / ``channels_last`` apply on GPU only),
              train_seconds
  provenance  mlflow_run_id, mlflow_parent_run_id, data_version (hash of the split manifests),
              git_commit, ray_run_name
``plots/finetune/<task>/<backbone>/seed<S>.csv`` -- per epoch: epoch, train_loss, val_loss,
  train_accuracy, val_accuracy, lr.

A run killed part-way (worker or whole process) is resumed by running the same command:
the Ray run name is derived from the run's full configuration, and its MLflow run id is
persisted next to the checkpoints, so the same MLflow run continues. A run that completed
with the same configuration is not trained again (its outputs are rewritten from the run
directory), unless ``fresh``: so a stage of several seeds that failed at its last seed
reruns only that seed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

from transferbench.cluster import connect
from transferbench.config import Settings
from transferbench.data.atomic import write_text
from transferbench.models import InputSpec, WeightsSource, build_classifier, effective_img_size
from transferbench.training.data import SPLITS, build_cache, read_manifests
from transferbench.training.metrics import write_curve_csv
from transferbench.training.ray_trainer import FINAL_FILE, HARDWARE_KEYS, WorkerSpec, fit_on_ray
from transferbench.training.tracking import RunRegistry, resolve_tracking_uri

RUN_ID_FILE = "mlflow_run.json"
COMPLETED_FILE = "COMPLETED"
RESULT_FILE = "result.json"  # the metrics JSON of a completed run, kept beside its checkpoints
METRIC_KEYS = ("accuracy", "balanced_accuracy", "macro_f1", "auroc")


def metrics_path(metrics_dir: str | Path, task: str, backbone: str, seed: int) -> Path:
    return Path(metrics_dir) / task / backbone / f"seed{seed}.json"


def curve_path(plots_dir: str | Path, task: str, backbone: str, seed: int) -> Path:
    return Path(plots_dir) / task / backbone / f"seed{seed}.csv"


def git_commit() -> str:
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, check=True).stdout
        return commit.strip() + ("-dirty" if dirty.strip() else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def run_finetune(settings: Settings, *, task: str, backbone: str, seed: int, num_workers: int | None = None,
                 metrics_dir: str | Path = "metrics/finetune", plots_dir: str | Path = "plots/finetune",
                 fresh: bool = False, kill_at_epoch: int | None = None, kill_rank: int = 0) -> dict[str, Any]:
    """Fine-tune ``backbone`` on ``task`` with ``seed``; returns (and writes) the metrics JSON.

    ``fresh``: train again even when a run with the same configuration completed (a new MLflow run).
    """
    started = time.perf_counter()
    entry = settings.backbone(backbone)
    task_settings = settings.task(task)
    protocol = settings.finetune_for(backbone)  # paper values, or the backbone's tuned lr/warm-up
    ray_settings = settings.ray
    if num_workers is not None:  # --workers N: N workers (elastic down to min(min_workers, N) if set; 0: local mode)
        floor = None if ray_settings.min_workers is None or num_workers == 0 else min(ray_settings.min_workers,
                                                                                      num_workers)
        ray_settings = dataclasses.replace(ray_settings, num_workers=num_workers, min_workers=floor)
    weights = WeightsSource.parse(entry.weights)
    img_size = effective_img_size(entry, protocol.img_size)

    manifests = read_manifests(settings.data.splits_dir, task)
    # Build the model once here: a missing/offline weights source fails now, with its message,
    # not inside Ray workers (where it would be retried max_failures times).
    probe = build_classifier(entry, num_classes=len(manifests.classes), img_size=img_size,
                             dropout=protocol.head_dropout)
    spec_in = InputSpec.of(probe.backbone)
    del probe
    side = spec_in.cache_side(img_size)
    caches = {s: build_cache(manifests, s, side=side, cache_dir=settings.data.cache_dir).resolve() for s in SPLITS}
    frames = {s: manifests.frame(s) for s in SPLITS}
    data_version = manifests.data_version()

    identity = {"study": settings.study.name, "task": task, "backbone": backbone, "seed": seed,
                "backbone_settings": dataclasses.asdict(entry), "finetune": dataclasses.asdict(protocol),
                "data_version": data_version, "img_size": img_size}
    run_key = hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:12]
    run_name = f"{task}.{backbone}.seed{seed}.{run_key}"
    storage = Path(ray_settings.storage_path).resolve()
    run_dir = storage / run_name
    tracking_uri = resolve_tracking_uri(settings.tracking.tracking_uri)
    registry = RunRegistry(tracking_uri=tracking_uri, experiment=settings.tracking.experiment,
                           artifact_location=settings.tracking.artifact_location)
    if (run_dir / COMPLETED_FILE).exists():
        if not fresh and (done := _completed_result(run_dir, registry)) is not None:
            _write_outputs(done, json.loads((run_dir / FINAL_FILE).read_text())["history"], metrics_dir, plots_dir)
            return done
        shutil.rmtree(run_dir)  # an identical run to train again: start afresh, in a new MLflow run
    run_dir.mkdir(parents=True, exist_ok=True)

    persisted = run_dir / RUN_ID_FILE
    previous = json.loads(persisted.read_text())["run_id"] if persisted.exists() else None
    commit = git_commit()
    tags = {"task": task, "backbone": backbone, "model": entry.model, "family": entry.family,
            "weights": entry.weights, "weights_label": weights.label, "random_init": str(weights.random_init).lower(),
            "seed": seed, "mode": protocol.mode, "mlflow.source.git.commit": commit, "data_version": data_version,
            "transferbench.hyperparameters": protocol.hyperparameters}
    run_id, reused = registry.child_run(study=settings.study.name, run_key=run_name,
                                        run_name=f"{task}/{backbone}/seed{seed}", tags=tags, reuse=previous)
    write_text(persisted, json.dumps({"run_id": run_id}))
    parent_id = registry.study_run(settings.study.name)
    registry.log_params(run_id, {
        **{f"finetune.{k}": v for k, v in dataclasses.asdict(protocol).items()},
        **{f"ray.{k}": v for k, v in dataclasses.asdict(ray_settings).items()},
        "task": task, "task.metric": task_settings.metric, "backbone": backbone, "model": entry.model,
        "family": entry.family, "weights": entry.weights, "random_init": weights.random_init, "seed": seed,
        "img_size": img_size, "cache_side": side, "input_mean": spec_in.mean, "input_std": spec_in.std,
        "num_classes": len(manifests.classes), "classes": ",".join(manifests.classes),
        "data_version": data_version, **{f"data.{s}_md5": manifests.md5(s) for s in SPLITS},
        **{f"data.{s}_rows": len(frames[s]) for s in SPLITS}, "git_commit": commit, "ray_run_name": run_name})
    registry.set_tags(run_id, {"transferbench.attempt_reused_run": str(reused).lower()})
    if not reused:
        registry.log_manifests(run_id, frames, manifests.paths, task=task,
                               digests={s: manifests.md5(s) for s in SPLITS})

    spec = WorkerSpec(
        task=task, backbone_name=backbone, backbone=entry, protocol=protocol, classes=manifests.classes, seed=seed,
        img_size=img_size, mean=spec_in.mean, std=spec_in.std, cache_files={s: str(p) for s, p in caches.items()},
        filenames={s: tuple(str(f) for f in frames[s]["filename"]) for s in SPLITS}, run_dir=str(run_dir),
        tracking_uri=tracking_uri, mlflow_run_id=run_id, system_metrics=settings.tracking.system_metrics,
        log_model=settings.tracking.log_model, use_gpu=ray_settings.use_gpu,
        mixed_precision=ray_settings.mixed_precision, channels_last=ray_settings.channels_last,
        loader_workers=ray_settings.loader_workers, local_mode=ray_settings.local_mode,
        checkpoints_to_keep=ray_settings.checkpoints_to_keep,
        kill_at_epoch=kill_at_epoch, kill_rank=kill_rank)
    if not ray_settings.local_mode:  # local mode trains in this process: no cluster to start or join
        connect(ray_settings.address)
    try:
        final = fit_on_ray(spec, run_name=run_name, storage_path=str(storage),
                           num_workers=ray_settings.scaling_workers, use_gpu=ray_settings.use_gpu,
                           cpus_per_worker=ray_settings.cpus_per_worker, max_failures=ray_settings.max_failures,
                           checkpoints_to_keep=ray_settings.checkpoints_to_keep,
                           placement_strategy=ray_settings.placement_strategy,
                           report_interval_s=ray_settings.report_interval_s)
    except Exception:
        registry.client.set_terminated(run_id, "FAILED")
        raise

    result: dict[str, Any] = {
        "task": task, "backbone": backbone, "model": entry.model, "family": entry.family, "weights": entry.weights,
        "weights_label": weights.label, "random_init": weights.random_init, "seed": seed,
        "study": settings.study.name, "mode": protocol.mode, "hyperparameters": protocol.hyperparameters,
        "lr": protocol.lr, "warmup_iters": protocol.warmup_iters, "warmup_lr": protocol.warmup_lr,
        "img_size": img_size, "num_workers": ray_settings.num_workers, "metric": task_settings.metric,
        "val_score": final.get(f"val_{task_settings.metric}"), "test_score": final.get(f"test_{task_settings.metric}"),
        **{f"{split}_{m}": final.get(f"{split}_{m}") for split in ("val", "test") for m in METRIC_KEYS},
        **{k: final[k] for k in ("best_epoch", "epochs_run", "best_val_loss", "stop_reason", "resumed_at_epochs")},
        "world_size": final["world_size"], "ray_nodes": len(set(final["worker_nodes"])),
        **{k: final[k] for k in HARDWARE_KEYS},
        "train_seconds": round(time.perf_counter() - started, 2),
        "mlflow_run_id": run_id, "mlflow_parent_run_id": parent_id, "data_version": data_version,
        "git_commit": commit, "ray_run_name": run_name,
    }
    _write_outputs(result, final["history"], metrics_dir, plots_dir)
    registry.client.log_metric(run_id, "train_seconds", result["train_seconds"])
    write_text(run_dir / RESULT_FILE, json.dumps(result, indent=2) + "\n")
    write_text(run_dir / COMPLETED_FILE, run_id + "\n")
    return result


def _write_outputs(result: dict[str, Any], history: list[dict[str, float]], metrics_dir: str | Path,
                   plots_dir: str | Path) -> None:
    task, backbone, seed = result["task"], result["backbone"], result["seed"]
    write_text(metrics_path(metrics_dir, task, backbone, seed), json.dumps(result, indent=2) + "\n")
    write_curve_csv(history, curve_path(plots_dir, task, backbone, seed))


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
