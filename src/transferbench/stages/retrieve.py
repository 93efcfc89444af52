"""Stage ``retrieve@<task>-<backbone>``: unsupervised retrieval with a backbone as it is (paper Table 8).

No training and no seeds (deterministic; a random-init backbone is drawn with seed 0): every
database image and query goes through the backbone's own pooled features (resize to
``retrieval.resize_ratio`` x the input side, centre crop, L2-normalised), every query ranks the
database by cosine similarity, and mAP follows the Oxford protocol (``evaluation.retrieval``).
``tasks.<task>.retrieval.query`` picks the query's feature: its whole image (the paper) or its
bounding box.

Features are cached under ``<data.cache_dir>/retrieval/<task>/<backbone>/<key>.npz``, the key hashing
the model, its weights, the input geometry, the query mode and every image's bytes, so a rerun with
unchanged inputs extracts nothing (DVC already skips an unchanged stage; the cache covers a stage
rerun for another reason, e.g. a tracking setting).

Outputs: ``<compare.metrics_dir>/<task>/<backbone>/frozen.json`` (mAP and the random ranking's; the rank table
reads it: n = 1) and its record in ``<compare.metrics_dir>.runs`` (identity, per-query AP, lineage),
``plots/retrieval/<task>/<backbone>.csv`` (the mean precision-recall curve for ``dvc plots``) and one
MLflow run (params, mAP and per-query AP, the PR curve and a top-k grid, the feature extractor as a
model, lineage to the data's hash).
"""

from __future__ import annotations

import hashlib
import json
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import timm
import torch

from transferbench.atomic import atomic_path, write_text
from transferbench.config import Settings
from transferbench.data.registry import dataset_root, get_dataset
from transferbench.engine.run_files import write_result
from transferbench.engine.tracking import MlflowTracker, RunRegistry
from transferbench.evaluation import retrieval
from transferbench.models import InputSpec, WeightsSource, create_backbone, effective_img_size
from transferbench.provenance import git_commit

BATCH_SIZE = 32
# A random-init backbone (weights: none) is drawn from this seed, so its features, and the stage, are
# deterministic: the result file's seed.
SEED = 0


def curve_path(plots_dir: str | Path, task: str, backbone: str) -> Path:
    return Path(plots_dir) / task / f"{backbone}.csv"


def _digest(paths: list[Path]) -> str:
    """One hash of every image's bytes, in order (the dataset's version, and part of the cache key)."""
    total = hashlib.sha256()
    for path in paths:
        total.update(hashlib.md5(path.read_bytes()).hexdigest().encode())
    return total.hexdigest()


def _features(model: Any, paths: list[Path], boxes: list | None, *, img_size: int, resize: int, spec: InputSpec,
              cache: Path) -> np.ndarray:
    if cache.is_file():
        return np.load(cache)["features"]
    features = retrieval.extract_features(model, paths, boxes=boxes, img_size=img_size, resize=resize,
                                          mean=spec.mean, std=spec.std, batch_size=BATCH_SIZE)
    with atomic_path(cache) as tmp:
        with open(tmp, "wb") as handle:
            np.savez(handle, features=features)
    return features


def _track(registry: RunRegistry, run_id: str, model: torch.nn.Module, *, params: dict[str, Any],
           metrics: dict[str, float], figures: Callable[[Path], list[Path]], img_size: int) -> None:
    """Log one retrieval run: params (a run left by a failed attempt keeps those it has), metrics, figures and
    the feature extractor as a model; the run ends FINISHED, or FAILED if logging fails."""
    registry.log_params(run_id, params)
    tracker = MlflowTracker(tracking_uri=registry.tracking_uri, run_id=run_id, system_metrics=False)
    try:
        tracker.log_metrics(metrics)
        with tempfile.TemporaryDirectory() as tmp:
            for figure in figures(Path(tmp)):
                tracker.log_artifact(figure, "figures")
        example = torch.zeros(1, 3, img_size, img_size)
        with torch.inference_mode():
            output = model(example)
        tracker.log_model(model, input_example=example.numpy(), output_example=output.numpy())
    except BaseException:
        tracker.close("FAILED")
        raise
    tracker.close()


def run(settings: Settings, *, task: str, backbone: str, plots_dir: str | Path = "plots/retrieval") -> dict[str, Any]:
    started = time.perf_counter()
    task_settings, entry = settings.task(task), settings.backbone(backbone)
    adapter = get_dataset(task_settings.dataset)
    root = dataset_root(settings.data, task_settings.dataset)
    database = adapter.manifest(root)
    queries = adapter.ground_truth(root)
    names = [Path(f).stem for f in database["filename"]]
    paths = [Path(f) for f in database["filename"]]
    by_name = dict(zip(names, paths))
    query_paths = [by_name[q.image] for q in queries]
    by_box = task_settings.retrieval.query == "bbox"
    query_boxes = [q.bbox for q in queries] if by_box else None

    img_size = effective_img_size(entry, settings.finetune.img_size)
    resize = round(img_size * task_settings.retrieval.resize_ratio)
    weights = WeightsSource.parse(entry.weights)
    torch.manual_seed(SEED)  # random-init weights: the same backbone in every process
    model = create_backbone(entry, img_size=img_size).eval()
    spec = InputSpec.of(model)
    data_version = _digest(paths)
    key_parts = {"model": entry.model, "weights": entry.weights, "seed": SEED, "timm": timm.__version__,
                 "torch": torch.__version__, "img_size": img_size, "resize": resize,
                 "mean": spec.mean, "std": spec.std, "data": data_version,
                 "queries": [(q.name, q.image, q.bbox) for q in queries], "query": task_settings.retrieval.query}
    key = hashlib.sha256(json.dumps(key_parts, sort_keys=True, default=str).encode()).hexdigest()[:16]
    cache_dir = Path(settings.data.cache_dir) / "retrieval" / task / backbone
    db_features = _features(model, paths, None, img_size=img_size, resize=resize, spec=spec,
                            cache=cache_dir / f"{key}.database.npz")
    q_features = (_features(model, query_paths, query_boxes, img_size=img_size, resize=resize, spec=spec,
                            cache=cache_dir / f"{key}.queries.npz") if by_box
                  else db_features[[names.index(q.image) for q in queries]])
    mean_ap, per_query, rankings = retrieval.mean_average_precision(queries, q_features, db_features, names)
    random_map = retrieval.random_ranking_map(queries, names, seed=0)

    registry = RunRegistry.from_settings(settings.tracking)
    study = settings.study.name
    commit = git_commit()
    run_name = f"{task}/{backbone}/frozen"
    run_id = registry.keyed_run(study=study, kind="retrieval", run_key=f"{run_name}.{key}", run_name=run_name,
                                parent=registry.study_run(study),
                                tags={"task": task, "task_kind": "retrieval", "backbone": backbone,
                                      "model": entry.model, "family": entry.family, "weights": entry.weights,
                                      "weights_label": weights.label, "random_init": str(weights.random_init).lower(),
                                      "mode": "frozen", "data_version": data_version,
                                      "mlflow.source.git.commit": commit})
    recall, precision = retrieval.mean_precision_recall(queries, rankings)
    previous = registry.client.get_run(run_id)
    if previous.info.status == "FINISHED":  # the same inputs (the key hashes them) tracked before: keep that run
        commit = previous.data.params.get("git_commit", commit)
    else:
        _track(registry, run_id, model, params={
            "task": task, "task.kind": "retrieval", "task.metric": task_settings.metric,
            "dataset": task_settings.dataset, "backbone": backbone, "model": entry.model,
            "family": entry.family, "weights": entry.weights, "random_init": weights.random_init,
            "img_size": img_size, "resize": resize, "query": task_settings.retrieval.query,
            "n_queries": len(queries), "n_database": len(names), "data_version": data_version,
            "feature_cache_key": key, "git_commit": commit},
            metrics={"test_map": mean_ap, "random_ranking_map": random_map,
                     **{f"ap.{name}": ap for name, ap in per_query.items()}},
            figures=lambda out: retrieval.figures(
                queries, rankings, by_name, out, per_query=per_query, mean_curve=(recall, precision),
                title=f"{task} / {backbone} ({weights.label}): mAP {mean_ap:.3f}"),
            img_size=img_size)

    result = {
        "task": task, "task_kind": "retrieval", "mode": "frozen", "backbone": backbone, "model": entry.model,
        "family": entry.family, "weights": entry.weights, "weights_label": weights.label,
        "random_init": weights.random_init, "seed": SEED, "study": study, "n_note": "deterministic: no seeds, n = 1",
        "img_size": img_size, "resize": resize, "query": task_settings.retrieval.query,
        "metric": task_settings.metric, "val_score": None, "test_score": mean_ap, "test_map": mean_ap,
        "baseline": "random ranking", "baseline_score": random_map,
        "n_queries": len(queries), "n_database": len(names),
        "test_ap": {name: float(ap) for name, ap in per_query.items()},
        "seconds": round(time.perf_counter() - started, 2), "mlflow_run_id": run_id, "data_version": data_version,
        "feature_cache_key": key, "git_commit": commit,
    }
    write_result(settings.compare.metrics_dir, result)
    curve = "\n".join(f"{float(r)!r},{float(p)!r}" for r, p in zip(recall, precision))
    write_text(curve_path(plots_dir, task, backbone), "recall,precision\n" + curve + "\n")
    return result
