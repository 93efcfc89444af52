"""The ``transferbench`` command line: one thin subcommand per pipeline stage.

Each subcommand parses its arguments, loads ``params.yaml`` through ``transferbench.config``
and calls its stage module's ``run`` (``transferbench.stages.<stage>``), imported when the
subcommand runs so that ``transferbench --help`` stays fast.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from typing import NoReturn

from transferbench.config import Settings, load_settings
from transferbench.errors import TransferbenchError

# name -> (one-line help, function that adds arguments, function that runs it)
Command = tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]
COMMANDS: dict[str, Command] = {}

# Exit codes. A TransferbenchError (bad params, data or baseline: the message names the file and key)
# exits EXIT_ERROR. For a gate, where 1 means drift, an unexpected exception (a bug) must not exit
# Python's 1: it exits EXIT_INTERNAL_ERROR, its traceback on stderr. Other commands let it propagate.
EXIT_DRIFT, EXIT_ERROR, EXIT_INTERNAL_ERROR = 1, 2, 3
GATES = frozenset({"compare"})


def command(name: str, help: str, arguments: Callable[[argparse.ArgumentParser], None] = lambda p: None):
    """Register a subcommand; the decorated function runs it and returns an exit code."""

    def register(run: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
        COMMANDS[name] = (help, arguments, run)
        return run

    return register


def _load(params: str) -> Settings:
    """params.yaml as every command reads it: a task's dataset is also checked against the dataset registry, so an
    unknown one fails at load, naming its key."""
    from transferbench.data.registry import list_datasets

    return load_settings(params, datasets=list_datasets())


def _check_params_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quiet", action="store_true", help="print nothing on success")


@command("check-params", "validate params.yaml and print the resolved settings", _check_params_arguments)
def _check_params(args: argparse.Namespace) -> int:
    settings = _load(args.params)
    if not args.quiet:
        print(f"{args.params}: ok (study {settings.study.name!r}: "
              f"{len(settings.study.tasks)} trained tasks x {len(settings.study.backbones)} backbones, "
              f"{sum(len(settings.modes_of(t)) * len(settings.seeds_of(t)) for t in settings.study.tasks)} "
              f"mode x seed runs per backbone; {len(settings.study.retrieval_tasks)} retrieval tasks)")
    return 0


def _register_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--summary", metavar="FILE",
                        help="where to write the registered versions and aliases (default: <reports>/registry.json)")


@command("register", "register each (task, backbone)'s best checkpoint in the MLflow Model Registry",
         _register_arguments)
def _register(args: argparse.Namespace) -> int:
    from transferbench.stages import register

    for row in register.run(_load(args.params), summary=args.summary):
        state = "new" if row["created"] else "unchanged"
        print(f"{row['registered_model']} v{row['version']} ({state}): {row['backbone']} seed {row['seed']}"
              + (f" @{', @'.join(row['aliases'])}" if row["aliases"] else ""))
    return 0


def _compare_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--baseline", nargs="?", const="", default=None, metavar="FILE",
                        help="drift gate: compare with this rank-table JSON (no FILE: params compare.baseline) "
                             "and exit 1 on drift or when a learning floor (compare.learning_floors) is not met")
    parser.add_argument("--drift-report", metavar="FILE", help="also write the drift Markdown here")
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = f"""exit codes (docs/registry-and-drift-gate.md):
  0  the rank table was written; with --baseline: no drift and every learning floor met
  {EXIT_DRIFT}  drift: a rank, the family order, a metric beyond tolerance or the study's structure
     (study, evaluation, backbone, metric or its direction) changed, or a learning floor is not met
  {EXIT_ERROR}  error in the input: a missing or malformed baseline or params.yaml, missing metrics
     (the message names the file and key at fault)
  {EXIT_INTERNAL_ERROR}  internal error: a bug in transferbench, not drift (traceback on stderr)"""


@command("compare", "rank backbones per task and family (reports/rank_table.*); optionally gate on drift",
         _compare_arguments)
def _compare(args: argparse.Namespace) -> int:
    from transferbench.stages import compare

    settings = _load(args.params)
    baseline = None if args.baseline is None else (args.baseline or settings.compare.baseline)
    result = compare.run(settings, baseline=baseline)
    if result.drift_report is None:
        paths = result.paths
        print(f"rank table: {paths['markdown']} (+ .csv, .json, {paths['heatmap'].name}, {paths['cd_diagram'].name})")
        return 0
    print(result.drift_report, end="")
    if args.drift_report:
        from pathlib import Path

        Path(args.drift_report).write_text(result.drift_report)
    return EXIT_DRIFT if result.drift else 0


def _report_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--mlflow-url", metavar="URL",
                        help="where the report's run links point (default: params report.mlflow_url, the local "
                             "`mlflow ui` address)")


@command("report", "the study report reports/index.html and its answer with uncertainty (reports/answer.json)",
         _report_arguments)
def _report(args: argparse.Namespace) -> int:
    from transferbench.stages import report

    result = report.run(_load(args.params), mlflow_url=args.mlflow_url)
    print(f"report: {result.html} (+ {result.answer.name}; logged to MLflow run {result.parent_run_id})\n"
          f"runs in MLflow (`mlflow ui`): {result.runs_url}")
    return 0


def _task_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("task", help="a task defined under 'tasks' in params.yaml")


def _datasets_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("datasets", nargs="*", help="datasets to fetch (default: those of study.tasks)")


def _logging() -> None:
    import logging

    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
    logger = logging.getLogger("transferbench")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)


@command("fetch", "materialise raw datasets under data.raw_dir from the mirror or upstream (checksums verified)",
         _datasets_argument)
def _fetch(args: argparse.Namespace) -> int:
    from transferbench.stages import fetch

    for line in fetch.run(_load(args.params), args.datasets):
        print(line)
    return 0


def _generate_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dataset", nargs="?", default="synthetic",
                        choices=["synthetic", "synthetic_b", "synthetic_age", "synthetic_retrieval", "synthetic_dense"],
                        help="the dataset to generate (default: %(default)s)")


@command("generate", "generate a synthetic dataset under data.generated_dir (deterministic; stage "
         "generate_synthetic@<dataset>)", _generate_arguments)
def _generate(args: argparse.Namespace) -> int:
    from transferbench.stages import generate_synthetic

    print(generate_synthetic.run(_load(args.params), args.dataset))
    return 0


@command("split", "write a task's train/val/test manifests, summary.json and quarantine.csv", _task_argument)
def _split(args: argparse.Namespace) -> int:
    from transferbench.stages import split

    _logging()
    print(split.run(_load(args.params), args.task))
    return 0


@command("validate", "run the great-expectations suites on a task's raw data and splits", _task_argument)
def _validate(args: argparse.Namespace) -> int:
    from transferbench.stages import validate

    _logging()
    print(validate.run(_load(args.params), args.task))
    return 0


def _finetune_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--task", required=True, help="task name under params.yaml tasks")
    parser.add_argument("--backbone", required=True, help="backbone name under params.yaml backbones")
    parser.add_argument("--seed", type=int, action="append", dest="seeds", metavar="SEED",
                        help="a training seed; repeat for several (default: every seed of study.seeds, one after "
                             "another in this process, each its own MLflow run, metrics JSON and curve)")
    parser.add_argument("--mode", action="append", dest="modes", choices=("full", "linear_probe"),
                        help="a training mode; repeat for both (default: the task's modes, else study.modes)")
    parser.add_argument("--workers", type=int, default=None,
                        help="override ray.num_workers (0: Ray Train local mode; the effective value is logged to "
                             "MLflow)")
    parser.add_argument("--fresh", action="store_true",
                        help="train again even if a run with the same configuration completed (default: reuse it)")
    parser.add_argument("--metrics-dir", default=None, help="default: params compare.metrics_dir")
    parser.add_argument("--plots-dir", default="plots/finetune", help="default: %(default)s")


def _skipped(settings: Settings, args: argparse.Namespace) -> bool:
    """A backbone the task does not list: leave the stage's outputs saying so, without starting the engine."""
    settings.backbone(args.backbone)
    settings.task(args.task)
    if settings.runs_on(args.task, args.backbone):
        return False
    from transferbench.stages.skipped import write_skipped

    reason = write_skipped(settings, task=args.task, backbone=args.backbone, metrics_dir=args.metrics_dir,
                           plots_dir=args.plots_dir)
    print(f"{args.task}/{args.backbone}: skipped ({reason})", flush=True)
    return True


@command("finetune", "train one backbone on one task, mode by mode and seed by seed (Ray Train, tracked in MLflow)",
         _finetune_arguments)
def _finetune(args: argparse.Namespace) -> int:
    settings = _load(args.params)
    if _skipped(settings, args):
        return 0
    from transferbench.stages import finetune

    for result in finetune.each_seed(settings, task=args.task, backbone=args.backbone,
                                     seeds=args.seeds or (), modes=args.modes or (), num_workers=args.workers,
                                     metrics_dir=args.metrics_dir,
                                     plots_dir=args.plots_dir, fresh=args.fresh):
        print(f"{args.task}/{args.backbone}/{result['mode']}/seed{result['seed']} ({result['weights_label']}): "
              f"test {result['metric']} {result['test_score']:.4f}, best epoch {result['best_epoch']}/"
              f"{result['epochs_run']}, mlflow run {result['mlflow_run_id']}", flush=True)
    return 0


@command("finetune-multitask", "train one backbone on a multitask task's components at once (one head each), seed "
         "by seed", _finetune_arguments)
def _finetune_multitask(args: argparse.Namespace) -> int:
    settings = _load(args.params)
    if _skipped(settings, args):
        return 0
    from transferbench.stages import finetune_multitask

    for result in finetune_multitask.each_run(settings, task=args.task, backbone=args.backbone, seeds=args.seeds or (),
                                              modes=args.modes or (), num_workers=args.workers,
                                              metrics_dir=args.metrics_dir, plots_dir=args.plots_dir,
                                              fresh=args.fresh):
        scores = ", ".join(f"{c['task']} {c['metric']} {c['test_score']:.4f}" for c in result["components"])
        print(f"{args.task}/{args.backbone}/{result['mode']}/seed{result['seed']} ({result['weights_label']}): "
              f"test {scores}; mlflow run {result['mlflow_run_id']}", flush=True)
    return 0


def _retrieve_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--task", required=True, help="a retrieval task under params.yaml tasks")
    parser.add_argument("--backbone", required=True, help="backbone name under params.yaml backbones")
    parser.add_argument("--plots-dir", default="plots/retrieval", help="default: %(default)s")


@command("retrieve", "unsupervised retrieval with one backbone's features (no training, no seeds): mAP on the "
         "Oxford protocol, tracked in MLflow", _retrieve_arguments)
def _retrieve(args: argparse.Namespace) -> int:
    from transferbench.stages import retrieve

    settings = _load(args.params)
    if settings.task(args.task).kind != "retrieval":
        raise TransferbenchError(f"retrieve --task {args.task}: a {settings.task(args.task).kind} task; "
                                 "retrieve runs tasks of kind retrieval (use finetune)")
    result = retrieve.run(settings, task=args.task, backbone=args.backbone, plots_dir=args.plots_dir)
    print(f"{args.task}/{args.backbone} ({result['weights_label']}): test mAP {result['test_map']:.4f} "
          f"(random ranking {result['baseline_score']:.4f}; {result['n_queries']} queries, "
          f"{result['n_database']} images), mlflow run {result['mlflow_run_id']}", flush=True)
    return 0


def _sensitivity_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--task", required=True, help="task name under params.yaml tasks")
    parser.add_argument("--backbone", required=True, help="backbone name under params.yaml backbones")
    parser.add_argument("--workers", type=int, default=1,
                        help="Optuna worker processes on this machine sharing the study (default: %(default)s); "
                             "the same command on other machines against one RDB storage joins the study")
    parser.add_argument("--worker-only", action="store_true",
                        help="run trials only (no study set-up, no summary): how --workers starts its processes")


@command("sensitivity", "Optuna study of lr / warm-up for one (task, backbone): trials in MLflow, "
         "<sensitivity.reports_dir>/<task>/studies/<backbone>.json", _sensitivity_arguments)
def _sensitivity(args: argparse.Namespace) -> int:
    from transferbench.stages import sensitivity

    summary = sensitivity.run(_load(args.params), task=args.task, backbone=args.backbone,
                              workers=args.workers, params_path=args.params, worker_only=args.worker_only)
    if summary is not None:
        imp = summary["importances"]
        print(f"{summary['study']}: {summary['counts']} ; fixed choice {summary['metric']} {summary['fixed_score']}, "
              f"best {summary['spread']['best']} ; fANOVA "
              + ", ".join(f"{k} {v:.2f}" for k, v in imp["fanova"].items()) + f" ; {summary['file']}")
    return 0


def _sensitivity_report_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--task", required=True, help="task name under params.yaml tasks")
    parser.add_argument("--backbones", nargs="+", default=None, help="default: params sensitivity.backbones")


@command("sensitivity-report", "aggregate a task's sensitivity studies: importances, curves, rank stability, "
         "best params (and the dvc exp run command that feeds them back)", _sensitivity_report_arguments)
def _sensitivity_report(args: argparse.Namespace) -> int:
    from transferbench.stages import sensitivity_report

    report = sensitivity_report.run(_load(args.params), task=args.task, backbones=args.backbones)
    stability = report["summary"]["rank_stability"]
    print(f"{args.task}: family order under the fixed choice {(stability['reference'] or {}).get('family_order')}, "
          f"differs in {stability['flip_fraction']} of {stability['n_configs'] - 1} sampled configurations; "
          f"{report['files']['summary'].parent}/")
    print("feed the best configurations back into the main study with:")
    print(report["command"])
    return 0


def _dashboard_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    parser.add_argument("--port", type=int, default=8080, help="port to listen on (default: %(default)s)")


@command("dashboard", "browse the sensitivity studies (params sensitivity.storage, $OPTUNA_STORAGE overrides) "
         "in optuna-dashboard; Ctrl-C stops it", _dashboard_arguments)
def _dashboard(args: argparse.Namespace) -> int:
    from pathlib import Path

    import optuna
    import optuna_dashboard

    from transferbench.tuning.storage import redact, resolve_storage_url

    settings = _load(args.params)
    url = resolve_storage_url(settings.sensitivity.storage)
    if url.startswith("sqlite:///") and not Path(url[len("sqlite:///"):]).is_file():
        raise TransferbenchError(f"{url[len('sqlite:///'):]}: no Optuna storage there yet (sensitivity.storage in "
                                 f"{args.params}, or $OPTUNA_STORAGE); run `transferbench sensitivity` first")
    # reads only: no heartbeats, no BEGIN IMMEDIATE (tuning.storage.open_storage), so it never holds up a worker
    engine = {"connect_args": {"timeout": 120}} if url.startswith("sqlite") else {"pool_pre_ping": True}
    storage = optuna.storages.RDBStorage(url, engine_kwargs=engine)
    print(f"optuna-dashboard on http://{args.host}:{args.port}/dashboard/ (storage {redact(url)}); "
          "Ctrl-C stops it", flush=True)
    try:
        optuna_dashboard.run_server(storage, host=args.host, port=args.port)
    except OSError as exc:  # e.g. the port is taken
        raise TransferbenchError(f"cannot serve on {args.host}:{args.port}: {exc}") from None
    return 0


UI_START_TIMEOUT = 120  # seconds for `mlflow ui` to answer /health (its first start on two cores takes ~15 s)
UI_STOP_TIMEOUT = 10  # seconds between SIGTERM and SIGKILL to the server's process group (stop_group)


def _ui_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    parser.add_argument("--port", type=int, default=5000, help="port to listen on (default: %(default)s)")
    parser.add_argument("--no-browser", dest="browser", action="store_false",
                        help="print the URL only, do not open it in a web browser")


def _ui_failure(log: os.PathLike, what: str) -> TransferbenchError:
    from pathlib import Path

    log = Path(log)
    tail = "\n".join(log.read_text(errors="replace").splitlines()[-20:]) if log.is_file() else ""
    return TransferbenchError(f"mlflow ui {what}; its log, {log}, ends:\n{tail}")


@command("ui", "open MLflow's UI on the study's training runs: `mlflow ui` on the study's store (params "
         "tracking.tracking_uri, $MLFLOW_TRACKING_URI overrides); Ctrl-C stops it", _ui_arguments)
def _ui(args: argparse.Namespace) -> int:
    import json
    import socket
    import tempfile
    import urllib.error
    import urllib.parse
    import urllib.request
    import webbrowser
    from pathlib import Path

    from transferbench.engine.cluster import stop_group
    from transferbench.engine.tracking import experiment_ui_url, repo_path, resolve_tracking_uri
    from transferbench.tuning.storage import redact

    tracking = _load(args.params).tracking
    store = resolve_tracking_uri(tracking.tracking_uri)
    shown = redact(store) if "://" in store else store  # no password on screen
    if store.split(":", 1)[0] in ("http", "https", "databricks"):
        raise TransferbenchError(f"the study's store is a tracking server ({shown}): open its own UI")
    if store.startswith("sqlite:///") and not Path(store[len("sqlite:///"):]).is_file():
        raise TransferbenchError(f"{store[len('sqlite:///'):]}: no MLflow store there yet (tracking.tracking_uri in "
                                 f"{args.params}, or $MLFLOW_TRACKING_URI); run `make repro` (or `dvc repro`) first")
    # a server already there (another `mlflow ui` on 5000, say) would answer for the one started here
    with socket.socket(socket.AF_INET6 if ":" in args.host else socket.AF_INET) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((args.host, args.port))
        except OSError as exc:
            raise TransferbenchError(f"cannot serve on {args.host}:{args.port}: {exc}; choose another --port") from None
    host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(args.host, args.host)  # where this machine reaches it
    ui = f"http://{f'[{host}]' if ':' in host else host}:{args.port}"
    mlflow = Path(sys.executable).with_name("mlflow")
    # the registry is the tracking store (stages/register.py); artifacts of mlflow-artifacts:/ experiments live under
    # tracking.artifact_location, wherever the command runs
    command = [str(mlflow)] if mlflow.is_file() else [sys.executable, "-m", "mlflow"]
    command += ["ui", "--backend-store-uri", store, "--registry-store-uri", store,
                "--artifacts-destination", repo_path(tracking.artifact_location).as_uri(),
                "--host", args.host, "--port", str(args.port), "--workers", "1"]
    descriptor, name = tempfile.mkstemp(prefix="transferbench-mlflow-ui-", suffix=".log")
    log = Path(name)
    with os.fdopen(descriptor, "w") as out:  # its own session: Ctrl-C reaches this process only, which stops it
        server = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                  start_new_session=True)
    interrupted = False
    try:
        deadline = time.monotonic() + UI_START_TIMEOUT
        while True:
            if server.poll() is not None:
                raise _ui_failure(log, f"exited ({server.returncode}) before it answered on {ui}")
            with contextlib.suppress(OSError), urllib.request.urlopen(f"{ui}/health", timeout=5) as answer:
                if answer.status == 200:
                    break
            if time.monotonic() > deadline:
                raise _ui_failure(log, f"did not answer on {ui}/health within {UI_START_TIMEOUT} s")
            time.sleep(0.3)
        query = urllib.parse.urlencode({"experiment_name": tracking.experiment})
        try:
            with urllib.request.urlopen(f"{ui}/api/2.0/mlflow/experiments/get-by-name?{query}", timeout=30) as answer:
                experiment_id = json.load(answer)["experiment"]["experiment_id"]
        except urllib.error.HTTPError as exc:
            if exc.code != 404:
                what = f"answered {exc.code} to the lookup of experiment {tracking.experiment!r}"
                raise _ui_failure(log, what) from None
            experiment_id = None
        link = experiment_ui_url(ui, experiment_id) if experiment_id is not None else ui
        print(f"MLflow UI: {link}", flush=True)
        if experiment_id is None:
            print(f"the study has no runs yet (no experiment {tracking.experiment!r} in {shown}): run "
                  "`make repro` (or `dvc repro`) first", file=sys.stderr, flush=True)
        print(f"serving {shown} (server log {log}); Ctrl-C stops it", file=sys.stderr, flush=True)
        if args.browser:
            webbrowser.open(link)
        code = server.wait()
        raise _ui_failure(log, f"exited ({code})")
    except KeyboardInterrupt:  # Ctrl-C, or SIGTERM (``entry``): a clean stop, its log is of no more use
        interrupted = True
        raise
    finally:
        stop_group(server, grace=UI_STOP_TIMEOUT)  # `mlflow ui`, its uvicorn worker, its job runners
        if interrupted:
            log.unlink(missing_ok=True)


def _weights_arguments(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="weights_action", required=True, metavar="<action>")
    add = actions.add_parser("add", help="import a downloaded timm checkpoint as a backbone's weights (offline)",
                             description="Check a timm checkpoint (.safetensors, .pth or .bin) key by key against "
                                         "the backbone's architecture, write it as models/NAME.safetensors, dvc add "
                                         "it and set the backbone's weights to file:models/NAME.safetensors.")
    add.add_argument("backbone", help="a backbone of the catalogue (backbones in params.yaml)")
    add.add_argument("file", help="the checkpoint: .safetensors, or .pth / .bin (read with weights_only)")
    add.add_argument("--name", help="write models/NAME.safetensors (default: the backbone's name)")
    add.add_argument("--no-dvc", dest="dvc", action="store_false",
                     help="do not `dvc add` the file (version it yourself)")
    add.add_argument("--params", default=argparse.SUPPRESS, help="path to params.yaml (default: params.yaml)")


@command("weights", "bring your own weights: `weights add BACKBONE FILE` imports a downloaded timm checkpoint, "
         "tracks it with DVC and points the catalogue at it (docs/weights.md)", _weights_arguments)
def _weights(args: argparse.Namespace) -> int:
    from transferbench.models.weights import add_weights

    done = add_weights(args.params, args.backbone, args.file, name=args.name, dvc=args.dvc)
    print(f"{done.backbone}: {done.source} matches timm model {done.model!r} ({done.tensors} tensors, "
          f"{done.parameters:,} values) -> {done.target}{' (already there)' if done.existed else ''}")
    print(f"{args.params}: backbones.{done.backbone}.weights: {done.previous} -> {done.weights}")
    if done.dvc_file:
        print(f"tracked by DVC: {done.dvc_file}")
        print(f"next: git add {done.dvc_file} {done.target.parent}/.gitignore {args.params} && dvc push")
    else:
        print(f"not tracked (--no-dvc); next: dvc add {done.target}, git add its .dvc file and {args.params}, "
              "dvc push")
    return 0


def _with_ray_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--cpus", type=int, default=None, help="CPUs of the head node (default: all of them)")
    parser.add_argument("--log-dir", default="data/ray_logs", help="the nodes' logs (default: %(default)s)")
    parser.add_argument("cmd", nargs=argparse.REMAINDER, metavar="-- COMMAND",
                        help="the command to run against the cluster, e.g. -- dvc repro")


@command("with-ray", "run a command (e.g. dvc repro) against one Ray head node started for it, so every "
         "fine-tune stage joins that cluster; with ray.address / RAY_ADDRESS set, or ray.num_workers 0 "
         "(local mode), just run it; an interrupt stops the command and the cluster", _with_ray_arguments)
def _with_ray(args: argparse.Namespace) -> int:
    from transferbench.engine.cluster import run_with_cluster

    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    if not cmd:
        raise TransferbenchError("with-ray: give the command to run after --, e.g. transferbench with-ray -- dvc repro")
    settings = _load(args.params)
    return run_with_cluster(cmd, params_address=settings.ray.address, log_dir=args.log_dir, cpus=args.cpus,
                            needs_cluster=not settings.ray.local_mode)


def _repro_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-j", "--jobs", type=int, default=os.cpu_count() or 1,
                        help="independent stages to run at once (default: the CPU count, %(default)s)")
    parser.add_argument("--dry-run", action="store_true", help="print the stages that would run, in order, and stop")
    parser.add_argument("targets", nargs="*", help="stages (or dvc.yaml files) to reproduce with what they depend on "
                                                   "(default: the whole study)")


@command("repro", "dvc repro with up to --jobs independent out-of-date stages at once, each recorded in dvc.lock by "
         "DVC itself (`dvc repro --single-item`); on a Ray cluster each reserves its fine-tune's resources",
         _repro_arguments)
def _repro(args: argparse.Namespace) -> int:
    from transferbench.engine.cluster import configured_address
    from transferbench.runner import Runner, plan, stage_resources

    settings = _load(args.params)
    steps = plan(".", args.targets)
    print(f"transferbench repro: {len(steps.order)} stage(s) to run, {steps.up_to_date} up to date; "
          f"up to {args.jobs} at once", flush=True)
    if args.dry_run:
        for stage in steps.order:
            print(f"  {stage}" + (f"  (after {', '.join(sorted(steps.needs[stage]))})" if steps.needs[stage] else ""))
        return 0
    ray = settings.ray
    runner = Runner(jobs=args.jobs, ray_address=configured_address(ray.address), emit=lambda line: print(line, flush=True),
                    resources=lambda stage: stage_resources(stage, local_mode=ray.local_mode,
                                                            cpus_per_worker=ray.cpus_per_worker, use_gpu=ray.use_gpu))
    return runner.run(steps)


# --help lists the stages in the order the pipeline runs them.
PIPELINE_ORDER = ("fetch", "generate", "split", "validate", "finetune", "finetune-multitask", "retrieve", "sensitivity",
                  "sensitivity-report",
                  "register", "compare", "repro", "with-ray", "check-params")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="transferbench",
        description="Reproducible ConvNets-vs-Transformers transfer study (DVC, Ray Train, MLflow, Optuna).")
    parser.add_argument("--params", default="params.yaml", help="path to params.yaml (default: %(default)s)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="<command>")
    for name in sorted(COMMANDS, key=lambda n: PIPELINE_ORDER.index(n) if n in PIPELINE_ORDER else len(PIPELINE_ORDER)):
        help_text, arguments, run = COMMANDS[name]
        child = sub.add_parser(name, help=help_text, description=help_text)
        arguments(child)
        child.set_defaults(run=run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not sys.stderr.isatty():  # MLflow's own download/upload bars too stay out of CI and `dvc repro` logs
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    try:
        return args.run(args)
    except TransferbenchError as exc:
        print(f"transferbench {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except Exception:
        if args.command not in GATES:
            raise
        traceback.print_exc()
        print(f"transferbench {args.command}: internal error (a bug, not drift): exit {EXIT_INTERNAL_ERROR}",
              file=sys.stderr)
        return EXIT_INTERNAL_ERROR


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


def entry() -> NoReturn:
    """The ``transferbench`` console script: ``main``, then exit without the interpreter's teardown.

    SIGTERM unwinds the command like Ctrl-C (a ``KeyboardInterrupt``): a fine-tune closes its
    MLflow run as KILLED and stops its threads, and rerunning the command resumes it. The exit
    code is then 128 + the signal's number.

    Tearing down the modules of torch, timm, MLflow and Ray at interpreter exit takes seconds, and
    every DVC stage of the study is one such process. What an exit must still do is done first, in
    the interpreter's order: non-daemon threads are joined, the atexit handlers run (Ray's
    disconnect, MLflow's and logging's flushes), stdout and stderr are flushed. An exception from
    ``main`` takes the normal way out, with its traceback (a gate's, ``compare``, is caught by ``main``:
    exit ``EXIT_INTERNAL_ERROR``).
    """
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        code = main()
    except KeyboardInterrupt as stop:
        received = signal.Signals.__members__.get(str(stop), signal.SIGINT)
        print(f"transferbench: interrupted ({received.name})", file=sys.stderr)
        code = 128 + received.value
    # threading's own exit hooks first (they tell idle thread-pool workers, e.g. MLflow's artifact downloads, to
    # stop), then the join of every non-daemon thread: what Py_Finalize does, in its order; joining alone hangs
    threading._shutdown()  # noqa: SLF001 -- no public equivalent
    atexit._run_exitfuncs()  # noqa: SLF001 -- the handlers Py_Finalize would run; no public equivalent
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    entry()
