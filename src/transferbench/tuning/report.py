"""Sensitivity outputs: one JSON per (task, backbone) study, and the task's summary, plots and best params.

Files (``<sensitivity.reports_dir>/<task>/``), also logged to MLflow:

``studies/<backbone>.json`` (per study; artifact of its ``sensitivity-study`` run)
  study, task, backbone, family, metric, higher_is_better, storage (password hidden), sampler,
  pruner, space, fixed (the protocol's lr/warmup_iters/warmup_lr), counts (per trial state),
  trials [number, config_index, state, label, params, score, intermediate {epoch: val metric},
  epochs_run, mlflow_run_id], importances {fanova, ped_anova, degenerate, n_trials}, spread,
  fixed_score, best (number, config_index, params, score), mlflow_run_id.
``summary.json`` (``sensitivity-report``; artifacts of the ``sensitivity`` parent run under <task>/)
  importances {backbones: {b: {fanova, ped_anova}}, families: {f: {fanova, ped_anova}}},
  spread {b: {best, median, worst_decile, worst, n}}, fixed_score {b}, rank_stability
  (see ``analysis.rank_stability``), counts {b: {COMPLETE, PRUNED, ...}}.
``best_params.json``: {b: {lr, warmup_iters, warmup_lr, score, fixed_score, config_index}} and the
  ``dvc exp run`` command that feeds them back (``finetune.hyperparameters: tuned``).
``lr_curve.png``, ``warmup_curve.png``: score against lr (log x) / warm-up length, one line per
  backbone, blue shades for ConvNets, orange shades for Transformers, a star at the fixed choice.
``importances.png``: fANOVA and PED-ANOVA per backbone and per family.

``<sensitivity.metrics_dir>/<task>.json``: what ``dvc metrics show`` prints of the task (``sensitivity_metrics``).
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from transferbench.atomic import write_json
from transferbench.config import TUNED_PARAMETERS, Settings
from transferbench.errors import TransferbenchError
from transferbench.engine.tracking import RunRegistry
from transferbench.engine.tasks import task_metric
from transferbench.tuning import analysis
from transferbench.tuning.study import SCHEMA, StudyHandle, fixed_choice, load_study, redact

REPORT_SCHEMA = "transferbench.sensitivity_report/1"
FAMILY_COLOURS = {"convnet": ("#08306b", "#2171b5", "#6baed6", "#9ecae1"),
                  "transformer": ("#7f2704", "#d94801", "#fd8d3c", "#fdae6b")}
MARKERS = ("o", "s", "^", "D", "v", "P")


def study_json_path(settings: Settings, task: str, backbone: str) -> Path:
    return Path(settings.sensitivity.reports_dir) / task / "studies" / f"{backbone}.json"


def task_dir(settings: Settings, task: str) -> Path:
    return Path(settings.sensitivity.reports_dir) / task


# --------------------------------------------------------------------------- one study
def trial_records(study: Any) -> list[dict[str, Any]]:
    """Every trial of an Optuna study as a plain dict (see the module docstring)."""
    out = []
    for t in study.get_trials(deepcopy=False):
        out.append({
            "number": t.number, "config_index": int(t.user_attrs.get("config_index", t.number)),
            "state": t.state.name, "label": t.user_attrs.get("label", "sampled"), "params": dict(t.params),
            "score": t.user_attrs.get("score"), "value": t.value,
            "intermediate": {str(k): v for k, v in sorted(t.intermediate_values.items())},
            "epochs_run": t.user_attrs.get("epochs_run"), "mlflow_run_id": t.user_attrs.get("mlflow_run_id"),
            "surplus": t.user_attrs.get("surplus"),
            "retry_of": t.system_attrs.get("failed_trial"),
        })
    return out


def summarise_study(settings: Settings, handle: StudyHandle, *, task: str, backbone: str) -> dict[str, Any]:
    """Write ``studies/<backbone>.json`` and log it (and headline metrics) to the study's MLflow run."""
    study, _ = load_study(settings, handle)
    s, entry, metric = settings.sensitivity, settings.backbone(backbone), settings.task(task).metric
    better = task_metric(settings.task(task), key=f"tasks.{task}.metric").higher_is_better
    records = trial_records(study)
    space = s.space.model_dump()
    counts: dict[str, int] = {}
    for r in records:
        counts[r["state"]] = counts.get(r["state"], 0) + 1
    best = analysis.best_trial(records, higher_better=better)
    summary = {
        "schema": SCHEMA, "study": handle.name, "task": task, "backbone": backbone, "family": entry.family,
        "model": entry.model, "weights": entry.weights, "metric": metric, "higher_is_better": better,
        "storage": redact(handle.storage_url), "sampler": s.sampler, "seed": s.seed,
        "pruner": s.pruner.model_dump(), "max_epochs": s.max_epochs, "n_trials": s.n_trials,
        "space": space, "fixed": fixed_choice(settings.finetune), "counts": counts,
        "importances": analysis.importances(records, space=space, higher_better=better, seed=s.seed,
                                            ped_anova_quantile=s.ped_anova_quantile),
        "spread": analysis.spread(records, higher_better=better), "fixed_score": analysis.fixed_score(records),
        "best": None if best is None else {k: best[k] for k in ("number", "config_index", "params", "score")},
        "mlflow_run_id": handle.study_run_id, "trials": records,
    }
    path = study_json_path(settings, task, backbone)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(summary, indent=2) + "\n")

    registry = RunRegistry.from_settings(settings.tracking)
    headline = {"n_complete": counts.get("COMPLETE", 0), "n_pruned": counts.get("PRUNED", 0),
                "n_failed": counts.get("FAIL", 0), "fixed_score": summary["fixed_score"],
                **{f"spread_{k}": v for k, v in summary["spread"].items() if k != "n"},
                **{f"importance_{e}_{p}": summary["importances"][e][p]
                   for e in analysis.EVALUATORS for p in TUNED_PARAMETERS}}
    if best is not None:
        headline |= {"best_score": best["score"], **{f"best_{k}": v for k, v in best["params"].items()}}
    registry.log_metrics(handle.study_run_id, headline)
    registry.client.log_artifact(handle.study_run_id, str(path))
    with tempfile.TemporaryDirectory() as tmp:
        for figure in write_figures({backbone: summary}, {backbone: entry.family}, Path(tmp), metric=metric,
                                    task=task).values():
            registry.client.log_artifact(handle.study_run_id, str(figure), artifact_path="plots")
    registry.client.set_terminated(handle.study_run_id, "FINISHED")
    return summary


# --------------------------------------------------------------------------- the task report
def read_studies(settings: Settings, task: str, backbones: Sequence[str]) -> dict[str, dict[str, Any]]:
    out = {}
    for backbone in backbones:
        path = study_json_path(settings, task, backbone)
        if not path.is_file():
            raise TransferbenchError(f"{path}: no sensitivity study for {task}/{backbone} "
                                     f"(run `transferbench sensitivity --task {task} --backbone {backbone}`)")
        out[backbone] = json.loads(path.read_text())
    return out


def feedback_command(best: Mapping[str, Mapping[str, Any]]) -> str:
    """The ``dvc exp run`` that trains the main study with the tuned values (``++`` adds or overrides)."""
    sets = [f"-S '++backbones.{b}.tuned={{lr: {v['lr']!r}, warmup_iters: {v['warmup_iters']}, "
            f"warmup_lr: {v['warmup_lr']!r}}}'" for b, v in best.items()]
    return "dvc exp run " + " ".join(sets) + " -S '++finetune.hyperparameters=tuned'"


def sensitivity_metrics(summary: Mapping[str, Any]) -> dict[str, Any]:
    """A task report's numbers for ``dvc metrics show`` / ``diff``: per backbone the fixed protocol choice's score and
    the best and median trial's, and the fraction of configurations under which the family ranking flips."""
    spread = summary["spread"]
    return {"fixed_score": dict(summary["fixed_score"]),
            "best_score": {b: v["best"] for b, v in spread.items()},
            "median_score": {b: v["median"] for b, v in spread.items()},
            "flip_fraction": summary["rank_stability"].get("flip_fraction")}


def task_report(settings: Settings, *, task: str, backbones: Sequence[str] | None = None) -> dict[str, Any]:
    """Aggregate every backbone's study of ``task``: summary.json, best_params.json, plots, MLflow."""
    backbones = list(backbones or settings.sensitivity.backbones)
    if not backbones:
        raise TransferbenchError("no backbones: set params sensitivity.backbones (or pass --backbones)")
    studies = read_studies(settings, task, backbones)
    metric = settings.task(task).metric
    better = task_metric(settings.task(task), key=f"tasks.{task}.metric").higher_is_better
    families = {b: studies[b]["family"] for b in backbones}
    per_backbone_importances = {b: {e: studies[b]["importances"][e] for e in analysis.EVALUATORS}
                                for b in backbones}
    best = {}
    for b in backbones:
        trial = analysis.best_trial(studies[b]["trials"], higher_better=better)
        if trial is not None:
            best[b] = {**trial["params"], "score": trial["score"], "config_index": trial["config_index"],
                       "fixed_score": studies[b]["fixed_score"]}
    command = feedback_command(best)
    summary = {
        "schema": REPORT_SCHEMA, "study": settings.study.name, "task": task, "metric": metric,
        "higher_is_better": better, "backbones": {b: {"family": families[b], "study": studies[b]["study"],
                                                      "mlflow_run_id": studies[b]["mlflow_run_id"]}
                                                  for b in backbones},
        "counts": {b: studies[b]["counts"] for b in backbones},
        "importances": {"backbones": per_backbone_importances,
                        "families": analysis.family_importances(per_backbone_importances, families),
                        "degenerate": {b: studies[b]["importances"]["degenerate"] for b in backbones}},
        "spread": {b: studies[b]["spread"] for b in backbones},
        "fixed_score": {b: studies[b]["fixed_score"] for b in backbones},
        "rank_stability": analysis.rank_stability({b: studies[b]["trials"] for b in backbones}, families,
                                                  higher_better=better),
    }
    out = task_dir(settings, task)
    out.mkdir(parents=True, exist_ok=True)
    files = {"summary": out / "summary.json", "best_params": out / "best_params.json"}
    files["summary"].write_text(json.dumps(summary, indent=2) + "\n")
    files["best_params"].write_text(json.dumps({"task": task, "metric": metric, "backbones": best,
                                                "command": command}, indent=2) + "\n")
    files["metrics"] = Path(settings.sensitivity.metrics_dir) / f"{task}.json"
    write_json(files["metrics"], sensitivity_metrics(summary))
    files |= write_figures(studies, families, out, metric=metric, task=task)
    _log_report(settings, task, files)
    return {"summary": summary, "best": best, "command": command, "files": files}


def _log_report(settings: Settings, task: str, files: Mapping[str, Path]) -> None:
    from transferbench.tuning.study import sensitivity_run

    registry = RunRegistry.from_settings(settings.tracking)
    run_id = sensitivity_run(registry, settings)
    for path in files.values():
        registry.client.log_artifact(run_id, str(path), artifact_path=task)


# --------------------------------------------------------------------------- figures
def _styles(families: Mapping[str, str]) -> dict[str, dict[str, Any]]:
    seen: dict[str, int] = {}
    out = {}
    for i, (backbone, family) in enumerate(families.items()):
        k = seen[family] = seen.get(family, -1) + 1
        palette = FAMILY_COLOURS.get(family, ("#444444",))
        out[backbone] = {"color": palette[k % len(palette)], "marker": MARKERS[i % len(MARKERS)]}
    return out


def write_figures(studies: Mapping[str, Mapping[str, Any]], families: Mapping[str, str], out: Path, *,
                  metric: str, task: str) -> dict[str, Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    styles = _styles(families)
    paths = {}
    for param, name, log in (("lr", "lr_curve", True), ("warmup_iters", "warmup_curve", False)):
        fig, ax = plt.subplots(figsize=(6.5, 4))
        for backbone, study in studies.items():
            points = sorted((r["params"][param], r["score"], r["config_index"], r["state"])
                            for r in analysis.scored(study["trials"]))
            if not points:
                continue
            xs, ys = [p[0] for p in points], [p[1] for p in points]
            ax.plot(xs, ys, linestyle="-", linewidth=1, alpha=0.8, color=styles[backbone]["color"],
                    marker=styles[backbone]["marker"], markersize=4,
                    label=f"{backbone} ({families[backbone]})")
            pruned = [(x, y) for x, y, _, state in points if state == "PRUNED"]
            if pruned:
                ax.scatter(*zip(*pruned, strict=True), facecolors="white", edgecolors=styles[backbone]["color"],
                           s=20, zorder=3)
            fixed = [(x, y) for x, y, i, _ in points if i == 0]
            if fixed:
                ax.scatter(*zip(*fixed, strict=True), marker="*", s=140, color=styles[backbone]["color"],
                           edgecolors="black", zorder=4)
        if log:
            ax.set_xscale("log")
        ax.set_xlabel(f"{param} (star: fixed protocol choice; open: pruned)")
        ax.set_ylabel(f"val {metric} at best epoch")
        ax.set_title(f"{task}: sensitivity to {param}", fontsize=10)
        ax.legend(fontsize=7)
        fig.tight_layout()
        paths[name] = out / f"{name}.png"
        fig.savefig(paths[name], dpi=100)
        plt.close(fig)

    groups = [*studies] + sorted(set(families.values()))
    family_imp = analysis.family_importances({b: s["importances"] for b, s in studies.items()}, families)
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), sharey=True)
    for ax, evaluator in zip(axes, analysis.EVALUATORS, strict=True):
        width = 0.8 / len(TUNED_PARAMETERS)
        for j, param in enumerate(TUNED_PARAMETERS):
            values = [studies[g]["importances"][evaluator][param] if g in studies else family_imp[g][evaluator][param]
                      for g in groups]
            ax.bar([i + j * width for i in range(len(groups))], values, width, label=param)
        ax.set_xticks([i + width for i in range(len(groups))])
        ax.set_xticklabels([g if g in studies else f"{g}\n(family)" for g in groups], rotation=30, fontsize=7)
        ax.set_title(evaluator, fontsize=10)
    axes[0].set_ylabel("importance (sums to 1)")
    axes[0].legend(fontsize=7)
    fig.suptitle(f"{task}: hyperparameter importances", fontsize=10)
    fig.tight_layout()
    paths["importances"] = out / "importances.png"
    fig.savefig(paths["importances"], dpi=100)
    plt.close(fig)
    return paths

