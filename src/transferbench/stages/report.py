"""Stage ``report``: the study as one page, ``<data.reports_dir>/index.html``, and its answer with uncertainty.

Reads what the study's stages wrote (rank table, registry, validation reports, split summaries,
learning curves, sensitivity reports) and, from the MLflow store, each run's per-image test
predictions and its task kind's figures. Writes ``index.html`` (self-contained: figures inlined) and
``answer.json`` (best ConvNet vs best Transformer per evaluation with paired bootstrap intervals,
McNemar's test, z-scores, ranking correlations, the verdict), logs both to the study's MLflow parent
run and gives that run a Markdown description with the verdict and the rank table.

Lineage: each table cell links every seed's MLflow run (``report.mlflow_url``, or ``--mlflow-url``),
and each evaluation names the DVC hash of its split, read from ``dvc.lock``.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import yaml
from mlflow.exceptions import MlflowException

from transferbench.atomic import write_text
from transferbench.config import Settings
from transferbench.engine.curves import curve_seed
from transferbench.engine.tracking import RunRegistry, experiment_ui_url, repo_path
from transferbench.evaluation import html_report
from transferbench.evaluation.answer import AnswerError
from transferbench.evaluation.study import MULTITASK_MODE, evaluations, study_results
from transferbench.evaluation.study_answer import study_answer
from transferbench.provenance import git_commit

PREDICTIONS = "predictions/test_predictions.csv"
DESCRIPTION_LIMIT = 7500  # characters: MLflow keeps a tag value of at most 8000


@dataclass(frozen=True)
class Report:
    html: Path
    answer: Path
    parent_run_id: str
    runs_url: str  # the study's training runs in the MLflow UI


class _Store:
    """The study's MLflow store, read for predictions and figures (each artifact downloaded once)."""

    def __init__(self, settings: Settings, workdir: Path) -> None:
        self.registry = RunRegistry.from_settings(settings.tracking)
        self.client = self.registry.client
        self.workdir = workdir
        self._tables: dict[str, pd.DataFrame] = {}

    def predictions(self, run_id: str) -> pd.DataFrame:
        if run_id not in self._tables:
            try:
                path = self.client.download_artifacts(run_id, PREDICTIONS, str(self.workdir / run_id))
            except (MlflowException, OSError) as exc:
                raise AnswerError(f"MLflow run {run_id} has no {PREDICTIONS} ({exc})") from exc
            self._tables[run_id] = pd.read_csv(path, keep_default_na=False, dtype={"label": str, "prediction": str})
        return self._tables[run_id]

    def figures(self, run_id: str) -> list[dict[str, str]]:
        """The run's task-kind figures (confusion matrix, masks, depth maps...), its learning curve left out."""
        out = []
        for item in self.client.list_artifacts(run_id, "plots"):
            name = Path(item.path).name
            if name.endswith(".png") and name != "learning_curve.png":
                local = self.client.download_artifacts(run_id, item.path, str(self.workdir / run_id))
                out.append({"name": name, "src": html_report.file_data_uri(Path(local))})
        return out


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text()) if path.is_file() else None


def _lock_hashes() -> dict[str, str]:
    """Each output path of ``dvc.lock`` -> its DVC hash (md5), plus ``data/raw`` from ``data.dvc``."""
    hashes = {}
    for name, stage in ((yaml.safe_load(repo_path("dvc.lock").read_text()) or {}).get("stages", {}).items()
                        if repo_path("dvc.lock").is_file() else []):
        for out in stage.get("outs", []):
            hashes[out["path"]] = out.get("md5", "")
    data_dvc = repo_path("data.dvc")
    if data_dvc.is_file():
        for out in (yaml.safe_load(data_dvc.read_text()) or {}).get("outs", []):
            hashes[out["path"]] = out.get("md5", "")
    return hashes


def _identity(settings: Settings, table: Mapping[str, Any], hashes: Mapping[str, str]) -> dict[str, Any]:
    backbones = table["backbones"]
    data = settings.data
    versions = [{"what": "raw data (data.dvc)", "path": data.raw_dir, "hash": hashes.get(data.raw_dir)}]
    versions += [{"what": f"split of {task}", "path": f"{data.splits_dir}/{task}",
                  "hash": hashes.get(f"{data.splits_dir}/{task}")} for task in settings.study.tasks]
    versions += [{"what": "generated dataset", "path": path, "hash": md5} for path, md5 in sorted(hashes.items())
                 if path.startswith(data.generated_dir + "/")]
    return {"name": table["study"], "git_commit": git_commit(), "data_versions": versions,
            "weights": {b: v["weights_label"] for b, v in backbones.items()},
            "random_init": [b for b, v in backbones.items() if v["weights"] == "none"]}


def _split_hash(settings: Settings, spec_task: str, hashes: Mapping[str, str]) -> str:
    if spec_task in settings.study.retrieval_tasks:
        return "no split: the dataset's own queries (raw data " + (hashes.get(settings.data.raw_dir) or "?") + ")"
    tasks = settings.task(spec_task).components or (spec_task,)
    return ", ".join(f"{t}: {hashes.get(f'{settings.data.splits_dir}/{t}') or 'not in dvc.lock'}" for t in tasks)


def _curves(settings: Settings, task: str, mode: str) -> dict[tuple[str, int], pd.DataFrame]:
    root = Path("plots/finetune") / task
    curves = {}
    for backbone in settings.backbones_of(task):
        for path in sorted((root / backbone / mode).glob("seed*.csv")):
            curves[(backbone, curve_seed(path))] = pd.read_csv(path)
    return curves


def _validation(settings: Settings) -> list[dict[str, Any]]:
    rows = []
    for task in settings.study.tasks:
        report = _read_json(Path(settings.data.reports_dir) / "validation" / f"{task}.json")
        summary = _read_json(Path(settings.data.splits_dir) / task / "summary.json") or {}
        suites: dict[str, dict[str, int]] = {}
        for result in (report or {}).get("results", []):
            counts = suites.setdefault(result["suite"], {"passed": 0, "failed": 0, "warnings": 0})
            key = "passed" if result["success"] else ("warnings" if result["severity"] == "warning" else "failed")
            counts[key] += 1
        rows.append({"task": task, "found": report is not None, "success": bool(report and report["success"]),
                     "suites": suites, "errors": (report or {}).get("errors", []),
                     "quarantine": summary.get("excluded", {}), "quarantined": summary.get("excluded_total", 0)})
    return rows


def _sensitivity(settings: Settings) -> list[dict[str, Any]]:
    rows = []
    for task in settings.sensitivity.tasks:
        folder = Path(settings.sensitivity.reports_dir) / task
        summary = _read_json(folder / "summary.json")
        if summary is None:
            continue
        stability = summary.get("rank_stability", {})
        rows.append({"task": task, "metric": summary["metric"], "counts": summary.get("counts", {}),
                     "flip_fraction": stability.get("flip_fraction"), "rank_flips": stability.get("rank_flips", {}),
                     "best_params": (_read_json(folder / "best_params.json") or {}).get("backbones", {}),
                     "figures": [{"name": p.name, "src": html_report.file_data_uri(p)}
                                 for p in sorted(folder.glob("*.png"))]})
    return rows


def _description(answer: Mapping[str, Any], rank_markdown: str, report_uri: str) -> str:
    head = (f"**{answer['study']}**{' (RANDOM-INIT backbones)' if answer['random_init'] else ''}\n\n"
            f"{answer['verdict']}\n\nThe full report: artifact `{report_uri}`.\n\n")
    body = rank_markdown.split("\n", 1)[1] if rank_markdown.startswith("# ") else rank_markdown
    text = head + body
    return text if len(text) <= DESCRIPTION_LIMIT else text[:DESCRIPTION_LIMIT - 40] + "\n\n…(see the report)"


def run(settings: Settings, *, mlflow_url: str | None = None) -> Report:
    reports = Path(settings.data.reports_dir)
    table = json.loads((reports / "rank_table.json").read_text())
    registry_rows = _read_json(reports / "registry.json") or []
    specs = evaluations(settings)
    results = study_results(settings, specs)
    hashes = _lock_hashes()
    url = (mlflow_url or settings.report.mlflow_url).rstrip("/")
    with tempfile.TemporaryDirectory() as tmp:
        store = _Store(settings, Path(tmp))
        parent = store.registry.study_run(settings.study.name)
        experiment = store.registry.experiment_id
        kinds = {e: settings.task(spec.component or spec.task).kind for e, spec in specs.items()}
        answer = study_answer(table, results, kinds=kinds, predictions=store.predictions,
                              resamples=settings.report.bootstrap_resamples, seed=settings.report.bootstrap_seed,
                              confidence=settings.report.confidence, alpha=settings.compare.alpha)
        runs: dict[tuple[str, str], list[dict[str, Any]]] = {}
        for r in sorted(results, key=lambda r: r.seed):
            runs.setdefault((r.evaluation, r.backbone), []).append(
                {"seed": r.seed, "run_id": r.mlflow_run_id, "url": experiment_ui_url(url, experiment, r.mlflow_run_id)})
        champions = {(row["task"], row["mode"]): row for row in registry_rows if "champion" in row["aliases"]}
        trained = [(t, m) for t in settings.study.tasks for m in settings.modes_of(t)]
        trained += [(t, MULTITASK_MODE) for t in settings.study.multitask_tasks]
        per_task = []
        for task, mode in trained:
            champion = champions.get((task, mode))
            per_task.append({
                "task": task, "mode": mode, "split": _split_hash(settings, task, hashes),
                "curves": html_report.learning_curves_figure(
                    _curves(settings, task, mode), title=f"{task} ({mode}): loss per epoch, every backbone and seed"
                    + (" (RANDOM-INIT)" if answer["random_init"] else "")),
                "champion": champion,
                "figures": store.figures(champion["mlflow_run_id"]) if champion else []})
        groups = [{"name": name, "evaluations": g["evaluations"], "families": g["families"],
                   "rows": html_report.group_rows(table, g["evaluations"], g["backbones"])}
                  for name, g in table["groups"].items()]
        overall = html_report.group_rows(table, list(table["tasks"]),
                                         {b: v["average_rank"] for b, v in table["backbones"].items()})
        context = {
            "identity": _identity(settings, table, hashes), "table": table, "answer": answer, "groups": groups,
            "overall": overall, "runs": runs, "mlflow_url": url, "experiment_id": experiment, "parent_run_id": parent,
            "run_url": lambda run_id=None: experiment_ui_url(url, experiment, run_id),
            "splits": {e: _split_hash(settings, spec.task, hashes) for e, spec in specs.items()},
            "figures": {"heatmap": _png(reports / "rank_heatmap.png"), "cd": _png(reports / "rank_cd_diagram.png"),
                        "correlations": html_report.correlation_figure(
                            answer["ranking_correlations"],
                            title="Spearman correlation of backbone rankings between evaluations"
                            + (" (RANDOM-INIT)" if answer["random_init"] else ""))},
            "per_task": per_task, "sensitivity": _sensitivity(settings), "validation": _validation(settings),
            "registry": registry_rows}
        html, answer_path = reports / "index.html", reports / "answer.json"
        write_text(answer_path, json.dumps(answer, indent=2, default=_jsonable) + "\n")
        write_text(html, html_report.render_report(context))
        client = store.client
        client.log_artifact(parent, str(html), "report")
        client.log_artifact(parent, str(answer_path), "report")
        rank_markdown = (reports / "rank_table.md").read_text() if (reports / "rank_table.md").is_file() else ""
        store.registry.describe(parent, _description(answer, rank_markdown, "report/index.html"))
    return Report(html, answer_path, parent, experiment_ui_url(url, experiment))


def _png(path: Path) -> str | None:
    return html_report.file_data_uri(path) if path.is_file() else None


def _jsonable(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    raise TypeError(f"not JSON serialisable: {value!r}")
