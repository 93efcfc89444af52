"""Write a small study to disk: its params.yaml and per-seed results (the training stage's output contract: each run's
metrics file and its record, ``engine.run_files``).

A uniquely named module (not conftest) so tests can import it without clashing with other folders' conftest.py.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from transferbench.config import TaskSettings
from transferbench.engine.run_files import read_run, write_result

REPO_PARAMS = Path(__file__).resolve().parents[2] / "params.yaml"

# family and ImageNet top-1 of the test backbones (timm test_* models).
BACKBONES = {
    "test_resnet": ("convnet", None),
    "test_convnext": ("convnet", 80.0),
    "test_vit": ("transformer", 80.5),
    "test_vit2": ("transformer", None),
}


def write_params(root: Path, *, tasks: Mapping[str, str], backbones: Sequence[str], seeds: Sequence[int],
                 study: str = "unit-study", tolerance: float = 0.05, floors: Mapping[str, float] | None = None,
                 task_backbones: Mapping[str, Sequence[str]] | None = None,
                 multitask: Mapping[str, Sequence[str]] | None = None, **tracking: str) -> Path:
    """A params.yaml for a study of ``tasks`` (evaluation -> metric) x ``backbones`` x ``seeds`` under ``root``.

    An evaluation ``<task>:linear_probe`` adds that mode to the task; a task whose metric is ``mae`` is an
    age task (lower is better). ``task_backbones``: a task's own backbones; ``multitask``: multitask tasks
    (study.multitask_tasks, metric loss) -> their components (tasks of ``tasks``).
    """
    # Start from the shipped params so sections other engineers own stay valid as they evolve.
    params = yaml.safe_load(REPO_PARAMS.read_text())
    template = {k: v for k, v in params["tasks"]["synthetic"].items() if k not in ("modes", "seeds")}
    age = {k: v for k, v in params["tasks"]["synthetic_age"].items() if k not in ("modes", "seeds")}
    task_specs: dict[str, dict] = {}
    for evaluation, metric in tasks.items():
        task, _, mode = evaluation.partition(":")
        spec = task_specs.setdefault(task, {**(age if metric == "mae" else template), "metric": metric,
                                            "modes": []})
        spec["modes"].append(mode or "full")
    for task, components in (multitask or {}).items():
        spec = {"kind": "multitask", "metric": "loss", "components": list(components)}
        if TaskSettings.model_fields["dataset"].is_required():  # until a multitask task may leave it out
            spec["dataset"] = template["dataset"]
        task_specs[task] = spec
    for task, own in (task_backbones or {}).items():
        task_specs[task]["backbones"] = list(own)
    params |= {
        "study": {"name": study, "tasks": [t for t in task_specs if t not in (multitask or {})],
                  "backbones": list(backbones), "seeds": list(seeds), "multitask_tasks": list(multitask or {})},
        "data": {**params.get("data", {}), "reports_dir": str(root / "reports"), "splits_dir": str(root / "splits")},
        "tasks": task_specs,
        "backbones": {b: {"model": b, "family": BACKBONES[b][0], "weights": "none", "preset": "tiny",
                          **({"imagenet_top1": BACKBONES[b][1]} if BACKBONES[b][1] else {})} for b in backbones},
        "compare": {"metrics_dir": str(root / "metrics"), "ranks_file": str(root / "ranks.json"),
                    "baseline": str(root / "baseline.json"), "metric_tolerance": tolerance,
                    "learning_floors": dict(floors or {})},
        "tracking": dict(tracking),
        "sensitivity": {**params["sensitivity"], "tasks": list(tasks)[:1], "backbones": list(backbones),
                        "metrics_dir": str(root / "metrics-sensitivity")},
    }
    path = root / "params.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


def metrics_record(task: str, backbone: str, seed: int, metric: str, test: float, val: float | None = None,
                   run_id: str = "0" * 32, **extra: Any) -> dict[str, Any]:
    """One run's result as the training stage writes it (``write_result`` splits it into its metrics file and its
    record: the input contract of evaluation.results)."""
    val = test if val is None else val
    task, _, mode = task.partition(":")
    record = {"task": task, "mode": mode or "full", "backbone": backbone, "model": backbone,
              "family": BACKBONES[backbone][0],
              "weights": "none", "random_init": True, "seed": seed, "mlflow_run_id": run_id, "metric": metric,
              "val_loss": 1.0 - val, "best_epoch": 1, "epochs_run": 2, "data_version": "md5:abc",
              "git_commit": "deadbeef"}
    for m in ("accuracy", "balanced_accuracy", "macro_f1"):
        record[f"val_{m}"] = val if m == metric else val * 0.9
        record[f"test_{m}"] = test if m == metric else test * 0.9
    record[f"val_{metric}"], record[f"test_{metric}"] = val, test  # e.g. mae, outside the loop above
    record.update(extra)
    return record


def multitask_record(task: str, backbone: str, seed: int, components: Sequence[Mapping[str, Any]], *,
                     val_loss: float = 1.0, run_id: str = "0" * 32, **extra: Any) -> dict[str, Any]:
    """One multitask run's result (the finetune stage's contract): ``components`` are entries
    ``{"task", "kind", "metric", "higher_is_better", "val_score", "test_score"}`` in component order."""
    record = {"task": task, "task_kind": "multitask", "mode": "full", "backbone": backbone, "model": backbone,
              "family": BACKBONES[backbone][0], "weights": "none", "random_init": True, "seed": seed,
              "mlflow_run_id": run_id, "metric": "loss", "val_loss": val_loss, "test_loss": val_loss + 0.1,
              "val_score": val_loss, "test_score": val_loss + 0.1, "baseline_score": None, "best_epoch": 1,
              "data_version": "md5:abc", "git_commit": "deadbeef", "components": [dict(c) for c in components]}
    for c in components:
        record[f"val_{c['task']}.{c['metric']}"] = c["val_score"]
        record[f"test_{c['task']}.{c['metric']}"] = c["test_score"]
    record.update(extra)
    return record


def write_metrics(metrics_dir: Path, scores: Mapping[str, Mapping[str, Sequence[float]]],
                  metrics: Mapping[str, str]) -> None:
    """``scores[evaluation][backbone]`` = per-seed test scores (seeds 0, 1, ...); val = test."""
    for task, per_backbone in scores.items():
        for backbone, values in per_backbone.items():
            for seed, value in enumerate(values):
                write_result(metrics_dir, metrics_record(task, backbone, seed, metrics[task], value))


def edit_result(metrics_dir: Path, task: str, backbone: str, seed: int, mode: str = "full", *,
                edit: Callable[[dict[str, Any]], None] | None = None, **changes: Any) -> dict[str, Any]:
    """Rewrite one run's files (metrics and record) with ``changes`` applied to its whole result, then ``edit`` (which
    changes the result in place); returns the new result."""
    result = {**read_run(metrics_dir, task, backbone, seed, mode), **changes}
    if edit is not None:
        edit(result)
    write_result(metrics_dir, result)
    return result


def log_served_classifier(backbone: str, *, seed: int, img_size: int, classes: Sequence[str] = ("a", "b")) -> str:
    """Log a real (untrained) classifier on a timm test_* backbone as the active MLflow run's ``serving`` model, the
    way training does (``engine.serving``); returns its model URI."""
    import numpy as np
    import torch

    from transferbench.config import BackboneSettings, FinetuneSettings
    from transferbench.engine.serving import example_png, log_serving_model, served_spec
    from transferbench.engine.tasks import kind_for_task
    from transferbench.models import InputSpec, build_model

    torch.manual_seed(seed + 100 * len(backbone))
    entry = BackboneSettings(model=backbone, family=BACKBONES[backbone][0], weights="none")
    task = TaskSettings.model_validate({"dataset": "synthetic", "metric": "accuracy", "split": {"rule": "random"}})
    summary = {"classes": list(classes)}
    kind, protocol = kind_for_task(task, summary), FinetuneSettings()
    model = build_model(entry, img_size=img_size, head=lambda n: kind.head(n, protocol)).eval()
    served = served_spec(task="synthetic", task_settings=task, summary=summary, backbone_name=backbone,
                         backbone=entry, protocol=protocol, seed=seed, img_size=img_size,
                         input_spec=InputSpec.of(model.backbone))
    example = example_png(np.zeros((3, img_size, img_size), dtype=np.uint8))
    return log_serving_model(model, served, example, ["torch", "timm"])


def assert_ranks_file(params: Path) -> dict[str, Any]:
    """The compare stage's ``compare.ranks_file`` (``dvc metrics``) holds the rank table's average ranks per family
    and backbone, its number of evaluations and its Friedman p-value, and only numbers; returns it."""
    raw = yaml.safe_load(params.read_text())
    ranks = json.loads(Path(raw["compare"]["ranks_file"]).read_text())
    table = json.loads((Path(raw["data"]["reports_dir"]) / "rank_table.json").read_text())
    assert ranks["average_rank"] == {
        "families": {f: v["average_rank"] for f, v in table["families"].items()},
        "backbones": {b: v["average_rank"] for b, v in table["backbones"].items()}}
    assert ranks["n_evaluations"] == len(table["tasks"])
    significance = table["significance"]
    assert ranks["friedman_p_value"] == (significance.get("p_value") if significance.get("applies") else None)
    numbers = [*ranks["average_rank"]["families"].values(), *ranks["average_rank"]["backbones"].values(),
               ranks["n_evaluations"]]
    assert numbers and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in numbers)
    return ranks


def edit_json(path: Path, edit: Callable[[dict[str, Any]], Any]) -> None:
    """Rewrite one JSON file (a metrics file or a record alone, to corrupt it) with ``edit`` applied in place."""
    raw = json.loads(path.read_text())
    edit(raw)
    path.write_text(json.dumps(raw))
