"""Optuna sensitivity studies: how much do lr and warm-up move the ranking? (PROTOCOL.md, "Sensitivity").

Zhou et al. (2021, Sec. 3) fix the learning rate (1e-4) and a frozen-backbone warm-up (200
iterations at 1e-6) by hand. One Optuna study per (task, backbone) varies exactly those three
values -- ``lr``, ``warmup_iters``, ``warmup_lr``, ranges in params ``sensitivity.space`` --
and keeps every other protocol value of ``finetune``, with a shorter budget
(``sensitivity.max_epochs``). The objective is the task's val metric (``tasks.<t>.metric``)
at the protocol's best epoch (lowest val loss); the test split is never looked at.

- **Trials run in the worker's process** through the same engine as the main study
  (``loop.fit``, the same inputs, model builder, loaders and task kind), so the pruning hook sees
  every epoch and a trial pays no start-up of its own. The val metric is reported every epoch
  (``trial.report``); the pruner (median, Hyperband or none) stops hopeless trials.
- **Trial 0 is the fixed protocol choice** (``finetune.lr/warmup_iters/warmup_lr``, enqueued).
  With the default ``qmc`` sampler, configurations 1..n_trials-1 are the points of a scrambled
  Sobol sequence (seed ``sensitivity.seed``) enqueued when the study is created, each with its
  ``config_index``: configuration i is identical for every backbone, whatever order workers
  run them in and however often they are killed, so backbones are compared on the same
  hyperparameters. With ``tpe``/``random`` the sampler proposes configurations as trials start
  (``config_index`` = trial number; not matched across backbones). Every trial starts from the
  same seed (initialisation and data order).
- **Storage**: RDBStorage on ``sensitivity.storage`` (default an embedded SQLite file; any
  SQLAlchemy URL for a shared study; ``$OPTUNA_STORAGE`` overrides) with heartbeats. The study
  name is ``<study.name>/<task>/<backbone>/<key>`` (key: hash of everything that defines the
  study except ``n_trials``), loaded if it exists: rerunning a killed command continues it.
  Opening (``transferbench.tuning.storage``) is safe from several processes at once, on a
  database that has no schema yet.
  ``n_trials`` counts finished (complete + pruned) trials.
- **Parallelism**: several Optuna worker processes on one storage (``--workers N`` spawns N on
  this machine; the same command on other machines against one RDB URL joins the study).
  A trial claims one of the ``n_trials`` slots when it starts, so workers together finish
  exactly ``n_trials`` (a trial that finds no free slot, or whose configuration another trial
  already holds, is marked FAIL with user attr ``surplus`` and never trains). A trial whose worker died is failed and re-enqueued with
  the same parameters and ``config_index``: at once when the worker was a process on this
  machine that no longer exists, otherwise by the storage heartbeat after ``grace_period``
  (``RetryUnclaimed``). A trial whose worker died before it could stamp it
  is reclaimed when it has been RUNNING for ``grace_period`` (a resumed run waits for that).
- **MLflow**: a ``sensitivity`` parent run per study name, one ``sensitivity-study`` run per
  (task, backbone) nested under it (holds the summary JSON), one ``sensitivity-trial`` run per
  trial nested under that (params, per-epoch metrics, tag ``state`` COMPLETE/PRUNED/FAIL).
"""

from __future__ import annotations

import datetime
import hashlib
import json
import logging
import math
import os
import socket
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import torch
from optuna.trial import FrozenTrial, TrialState

from transferbench.config import TUNED_PARAMETERS, FinetuneSettings, SensitivitySettings, Settings
from transferbench.engine import loop
from transferbench.engine.cluster import configured_address, connect
from transferbench.engine.augment import batch_augment
from transferbench.engine.data import CachedImages, eval_loader, read_manifests, train_loader
from transferbench.engine.inputs import prepare_inputs
from transferbench.engine.tasks import task_metric
from transferbench.engine.tracking import RunRegistry
from transferbench.errors import TransferbenchError
from transferbench.models import build_model
from transferbench.progress import PROGRESS_ENV, progress
from transferbench.tuning.storage import STORAGE_ENV, open_storage, redact, resolve_storage_url

# QMCSampler, heartbeats and the retry callback are marked experimental; the pins fix their behaviour.
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)

log = logging.getLogger(__name__)
RAY_NODE_ENV = "TRANSFERBENCH_RAY_NODE"
# The driver's service URIs travel to Ray workers (which inherit the raylet's environment, not ours).
FORWARDED_ENV = ("MLFLOW_TRACKING_URI", STORAGE_ENV, "MLFLOW_HTTP_REQUEST_MAX_RETRIES",
                 "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "MLFLOW_HTTP_REQUEST_TIMEOUT")
FIXED_LABEL = "fixed protocol choice"
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
SCHEMA = "transferbench.sensitivity_study/1"


class StudyFull(TransferbenchError):
    """Raised inside a trial that found all n_trials slots taken (the trial is marked FAIL)."""


# --------------------------------------------------------------------------- sampler, pruner
def make_sampler(sensitivity: SensitivitySettings) -> optuna.samplers.BaseSampler:
    seed = sensitivity.seed
    if sensitivity.sampler == "qmc":
        return optuna.samplers.QMCSampler(qmc_type="sobol", scramble=True, seed=seed,
                                          independent_sampler=optuna.samplers.RandomSampler(seed=seed))
    if sensitivity.sampler == "tpe":
        return optuna.samplers.TPESampler(seed=seed, multivariate=True)
    return optuna.samplers.RandomSampler(seed=seed)


def make_pruner(sensitivity: SensitivitySettings) -> optuna.pruners.BasePruner:
    p = sensitivity.pruner
    if p.kind == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=p.n_startup_trials, n_warmup_steps=p.n_warmup_steps)
    if p.kind == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=p.min_resource, max_resource=sensitivity.max_epochs,
                                              reduction_factor=p.reduction_factor)
    return optuna.pruners.NopPruner()


def fixed_choice(protocol: FinetuneSettings) -> dict[str, Any]:
    """The protocol's hand-fixed values (``TUNED_PARAMETERS``): trial 0 of every study."""
    return {name: getattr(protocol, name) for name in TUNED_PARAMETERS}


def qmc_configs(sensitivity: SensitivitySettings, n: int) -> list[dict[str, Any]]:
    """Configurations 1..n-1: scrambled Sobol points mapped onto the search space (log where asked)."""
    from scipy.stats import qmc

    space = sensitivity.space
    with warnings.catch_warnings():  # Sobol's balance warning for n not a power of 2
        warnings.simplefilter("ignore")
        points = qmc.Sobol(d=3, scramble=True, seed=sensitivity.seed).random(max(n - 1, 1))[: n - 1]

    def real(u: float, r: Any) -> float:
        if r.log:
            return float(math.exp(math.log(r.low) + u * (math.log(r.high) - math.log(r.low))))
        return float(r.low + u * (r.high - r.low))

    lo, hi = space.warmup_iters.low, space.warmup_iters.high
    return [{"lr": real(u[0], space.lr), "warmup_iters": min(hi, lo + int(u[1] * (hi - lo + 1))),
             "warmup_lr": real(u[2], space.warmup_lr)} for u in points]


def study_name(settings: Settings, *, task: str, backbone: str, data_version: str) -> str:
    """``<study.name>/<task>/<backbone>/<key>``; the key changes with anything that defines the trials."""
    s = settings.sensitivity
    identity = {
        "space": s.space.model_dump(), "sampler": s.sampler, "seed": s.seed, "max_epochs": s.max_epochs,
        "pruner": s.pruner.model_dump(), "metric": settings.task(task).metric,
        "finetune": settings.finetune.model_dump(exclude={"hyperparameters"}),
        "backbone": settings.backbone(backbone).model_dump(exclude={"tuned"}),
        "data_version": data_version,
    }
    key = hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:8]
    return f"{settings.study.name}/{task}/{backbone}/{key}"


def worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _dead_trials(study: optuna.Study, grace_period: float) -> tuple[list[FrozenTrial], float]:
    """RUNNING trials whose worker is gone, and how many seconds until the next unclaimed one is."""
    host, now, dead, wait = socket.gethostname(), datetime.datetime.now(), [], 0.0
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        owner = trial.user_attrs.get("worker")
        if owner is None:  # unclaimed: dead once it has been so for grace_period (a live worker takes ms)
            age = (now - trial.datetime_start).total_seconds() if trial.datetime_start else grace_period
            if age < grace_period:
                wait = max(wait, grace_period - age)
                continue
        else:
            owner_host, _, pid = str(owner).rpartition(":")
            if owner_host != host or not pid.isdigit() or _alive(int(pid)):
                continue
        dead.append(trial)
    return dead, wait


def reclaim_dead_trials(study: optuna.Study, storage: optuna.storages.RDBStorage,
                        sensitivity: SensitivitySettings) -> list[int]:
    """Fail and re-enqueue RUNNING trials whose worker is gone; returns their numbers.

    - A trial stamped (user attr ``worker``) by a process on this machine that no longer exists is
      reclaimed at once, its trial re-run with the same parameters and ``config_index``. Workers
      elsewhere are handled by the storage heartbeat (``grace_period``).
    - A trial Optuna marked RUNNING that no worker stamped lost its worker between Optuna's
      ``ask`` and the objective's first line. It has no owner to check, and possibly no heartbeat
      (Optuna's stale-trial check never fails those). It is reclaimed once it has been RUNNING for
      ``grace_period``, and this call waits until then: otherwise it would hold one of the
      ``n_trials`` slots forever, and the study would end one trial short.
    """
    retry = storage.get_heartbeat_stale_trial_callback()  # open_storage's RetryUnclaimed: one retry policy
    reclaimed: list[int] = []
    while True:
        dead, wait = _dead_trials(study, sensitivity.grace_period)
        for trial in dead:
            try:
                if storage.set_trial_state_values(trial._trial_id, state=TrialState.FAIL):
                    retry(study, storage.get_trial(trial._trial_id))
                    reclaimed.append(trial.number)
            except optuna.exceptions.UpdateFinishedTrialError:
                pass  # another process reclaimed it first
        if not wait:
            return reclaimed
        log.warning("%s: waiting %.0f s for a trial no worker claimed (its worker died as it started) to pass "
                    "grace_period", study.study_name, wait)
        time.sleep(min(wait, sensitivity.heartbeat_interval))


# --------------------------------------------------------------------------- the study handle
@dataclass(frozen=True)
class StudyHandle:
    """Where one (task, backbone) study lives: Optuna storage + name, MLflow runs."""

    name: str
    storage_url: str
    tracking_uri: str
    sensitivity_run_id: str
    study_run_id: str


def sensitivity_run(registry: RunRegistry, settings: Settings) -> str:
    """The parent run of every sensitivity study of ``study.name``."""
    name = settings.study.name
    run_id = registry.keyed_run(study=name, kind="sensitivity", run_key=f"{name}/sensitivity",
                                run_name=f"{name} sensitivity")
    registry.client.set_terminated(run_id, "FINISHED")
    return run_id


def load_study(settings: Settings, handle: StudyHandle) -> tuple[optuna.Study, optuna.storages.RDBStorage]:
    storage = open_storage(handle.storage_url, settings.sensitivity)
    study = optuna.load_study(study_name=handle.name, storage=storage, sampler=make_sampler(settings.sensitivity),
                              pruner=make_pruner(settings.sensitivity))
    return study, storage


def prepare_study(settings: Settings, *, task: str, backbone: str) -> StudyHandle:
    """Create (or load) the study, enqueue the fixed choice as trial 0 and find/create its MLflow runs."""
    task_settings, entry = settings.task(task), settings.backbone(backbone)
    manifests = read_manifests(settings.data.splits_dir, task)
    name = study_name(settings, task=task, backbone=backbone, data_version=manifests.data_version())
    url = resolve_storage_url(settings.sensitivity.storage)
    storage = open_storage(url, settings.sensitivity)
    metric = task_metric(task_settings, key=f"tasks.{task}.metric")
    direction = "maximize" if metric.higher_is_better else "minimize"
    study = optuna.create_study(study_name=name, storage=storage, direction=direction, load_if_exists=True,
                                sampler=make_sampler(settings.sensitivity), pruner=make_pruner(settings.sensitivity))
    planned = [fixed_choice(settings.finetune)]
    if settings.sensitivity.sampler == "qmc":
        planned += qmc_configs(settings.sensitivity, settings.sensitivity.n_trials)
    present = {t.user_attrs.get("config_index", t.number) for t in study.get_trials(deepcopy=False)}
    for index, params in enumerate(planned):
        if index not in present:  # a raised n_trials enqueues only the new configurations
            study.enqueue_trial(params, user_attrs={"config_index": index,
                                                    "label": FIXED_LABEL if index == 0 else "sampled"})
    registry = RunRegistry.from_settings(settings.tracking)
    parent = sensitivity_run(registry, settings)
    run_id = study.user_attrs.get("mlflow_run_id")
    if run_id is None:
        run_id = registry.keyed_run(
            study=settings.study.name, kind="sensitivity-study", run_key=name, run_name=f"{task}/{backbone}",
            parent=parent, tags={"task": task, "backbone": backbone, "model": entry.model, "family": entry.family,
                                 "weights": entry.weights, "optuna.study": name, "optuna.storage": redact(url)})
        study.set_user_attr("mlflow_run_id", run_id)
        registry.log_params(run_id, {
            "task": task, "backbone": backbone, "metric": task_settings.metric, "direction": direction,
            "sampler": settings.sensitivity.sampler, "seed": settings.sensitivity.seed,
            "pruner": settings.sensitivity.pruner.kind, "max_epochs": settings.sensitivity.max_epochs,
            **{f"space.{k}": json.dumps(v) for k, v in settings.sensitivity.space.model_dump().items()},
            **{f"fixed.{k}": v for k, v in fixed_choice(settings.finetune).items()}})
    return StudyHandle(name=name, storage_url=url, tracking_uri=registry.tracking_uri, sensitivity_run_id=parent,
                       study_run_id=run_id)


# --------------------------------------------------------------------------- one trial
def score_at_best_epoch(history: list[dict[str, float]], metric: str, best_epoch: int) -> float:
    """The val metric at the protocol's best epoch (lowest val loss); the last epoch if none improved."""
    by_epoch = {int(h["epoch"]): h for h in history}
    epoch = best_epoch if best_epoch in by_epoch else max(by_epoch)
    return float(by_epoch[epoch][f"val_{metric}"])


class _ReportAndPrune:
    """Epoch hook: per-epoch metrics to the trial's MLflow run, val metric to Optuna, pruning."""

    def __init__(self, trial: optuna.Trial, registry: RunRegistry, run_id: str, metric: str) -> None:
        self.trial, self.registry, self.run_id, self.metric = trial, registry, run_id, metric
        self.pruned = False

    def __call__(self, record: dict[str, float], session: loop.FitSession) -> bool:
        epoch = int(record["epoch"])
        self.registry.log_metrics(self.run_id, {k: v for k, v in record.items() if k != "epoch"}, step=epoch)
        self.trial.report(float(record[f"val_{self.metric}"]), epoch)
        if not session.state.finished and self.trial.should_prune():
            self.pruned = True
            return True
        return False


class SensitivityObjective:
    """Optuna objective: one short fine-tune of ``backbone`` on ``task`` per trial, in this process."""

    def __init__(self, settings: Settings, handle: StudyHandle, *, task: str, backbone: str) -> None:
        self.settings, self.handle, self.task, self.backbone = settings, handle, task, backbone
        self.entry = settings.backbone(backbone)
        self.metric = settings.task(task).metric
        self.sensitivity = settings.sensitivity
        self.base = settings.finetune.model_copy(update={"max_epochs": self.sensitivity.max_epochs})
        inputs = prepare_inputs(settings.data, task, settings.task(task), self.entry, self.base, splits=("train", "val"))
        self.kind, self.img_size = inputs.kind, inputs.img_size
        mean, std = inputs.spec.mean, inputs.spec.std
        self.device = torch.device("cuda" if settings.ray.use_gpu and torch.cuda.is_available() else "cpu")
        self.augment = batch_augment(self.base, self.kind, device=self.device, img_size=self.img_size, mean=mean,
                                     std=std)
        self.train_set = CachedImages(inputs.caches["train"], img_size=self.img_size, mean=mean, std=std, train=True,
                                      rotation_degrees=self.base.rotation_degrees, hflip=self.base.hflip,
                                      augment=self.kind.train_transforms(self.img_size, self.base),
                                      device_augment=self.augment is not None)
        self.val_set = CachedImages(inputs.caches["val"], img_size=self.img_size, mean=mean, std=std, train=False)
        self.registry = RunRegistry.from_settings(settings.tracking)

    def _claim(self, trial: optuna.Trial, index: int) -> str | None:
        """Why this trial may not run (all n_trials slots taken, or its configuration already taken), or None."""
        earlier = [t for t in trial.study.get_trials(deepcopy=False, states=(*FINISHED, TrialState.RUNNING))
                   if t.number < trial.number]
        if len(earlier) >= self.sensitivity.n_trials:
            return "surplus"
        if any(t.user_attrs.get("config_index") == index for t in earlier):
            return "duplicate"
        return None

    def __call__(self, trial: optuna.Trial) -> float:
        trial.set_user_attr("worker", worker_id())
        if os.environ.get(RAY_NODE_ENV):  # a Ray task on a cluster node (run_workers_on_ray)
            trial.set_user_attr("ray_node", os.environ[RAY_NODE_ENV])
        index = int(trial.user_attrs.get("config_index", trial.number))
        refused = self._claim(trial, index)
        if refused:
            trial.set_user_attr("surplus", refused)
            if refused == "surplus":
                trial.study.stop()
            raise StudyFull(f"{self.handle.name}: trial {trial.number} not run ({refused})")
        trial.set_user_attr("config_index", index)
        space = self.sensitivity.space
        params = {
            "lr": trial.suggest_float("lr", space.lr.low, space.lr.high, log=space.lr.log),
            "warmup_iters": trial.suggest_int("warmup_iters", space.warmup_iters.low, space.warmup_iters.high),
            "warmup_lr": trial.suggest_float("warmup_lr", space.warmup_lr.low, space.warmup_lr.high,
                                             log=space.warmup_lr.log),
        }
        protocol = self.base.model_copy(update=params)
        label = trial.user_attrs.get("label", "sampled")
        study = self.settings.study.name
        run_id = self.registry.keyed_run(
            study=study, kind="sensitivity-trial", run_key=f"{self.handle.name}/trial{trial.number}",
            run_name=f"{self.task}/{self.backbone}/trial{trial.number}", parent=self.handle.study_run_id,
            tags={"task": self.task, "backbone": self.backbone, "family": self.entry.family, "state": "RUNNING",
                  "optuna.study": self.handle.name, "optuna.trial": trial.number, "config_index": index,
                  "label": label})
        trial.set_user_attr("mlflow_run_id", run_id)
        self.registry.log_params(run_id, {
            **params, "config_index": index, "label": label, "optuna.trial": trial.number,
            "max_epochs": protocol.max_epochs, "seed": self.sensitivity.seed, "metric": self.metric,
            **{f"finetune.{k}": v for k, v in protocol.model_dump().items()}})
        hook = _ReportAndPrune(trial, self.registry, run_id, self.metric)
        try:
            loop.seed_everything(self.sensitivity.seed)  # every trial starts from the same weights
            model = build_model(self.entry, img_size=self.img_size, head=lambda n: self.kind.head(n, protocol))
            seed = self.sensitivity.seed
            session = loop.fit(
                model, kind=self.kind, protocol=protocol, seed=seed, hooks=[hook], device=self.device,
                augment=self.augment,
                train_loader=train_loader(self.train_set, batch_size=protocol.batch_size, seed=seed),
                val_loader=eval_loader(self.val_set, batch_size=protocol.eval_batch_size))
        except BaseException:
            self.registry.set_tags(run_id, {"state": "FAIL"})
            self.registry.client.set_terminated(run_id, "FAILED")
            raise
        state = session.state
        score = score_at_best_epoch(state.history, self.metric, state.best_epoch)
        attrs = {"score": score, "epochs_run": state.epoch, "best_epoch": state.best_epoch}
        for key, value in attrs.items():
            trial.set_user_attr(key, value)
        outcome = "PRUNED" if hook.pruned else "COMPLETE"
        self.registry.log_metrics(run_id, {"score": score, "epochs_run": state.epoch, "best_epoch": state.best_epoch})
        self.registry.set_tags(run_id, {"state": outcome})
        self.registry.client.set_terminated(run_id, "FINISHED")
        if hook.pruned:
            raise optuna.TrialPruned(f"pruned after epoch {state.epoch}")
        return score


# --------------------------------------------------------------------------- running
def finished_count(study: optuna.Study) -> int:
    return len(study.get_trials(deepcopy=False, states=FINISHED))


def work(settings: Settings, handle: StudyHandle, *, task: str, backbone: str) -> None:
    """One Optuna worker: run trials until the study has n_trials finished trials."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study, storage = load_study(settings, handle)
    reclaim_dead_trials(study, storage, settings.sensitivity)
    n_trials = settings.sensitivity.n_trials
    if finished_count(study) >= n_trials:
        return
    objective = SensitivityObjective(settings, handle, task=task, backbone=backbone)
    with progress(desc=f"trials {task}/{backbone}", total=n_trials, initial=finished_count(study),
                  unit="trial") as bar:

        def advance(study: optuna.Study, trial: FrozenTrial) -> None:
            bar.n = finished_count(study)  # every worker's finished trials, not only this one's
            bar.refresh()

        study.optimize(objective, catch=(StudyFull,),
                       callbacks=[optuna.study.MaxTrialsCallback(n_trials, states=FINISHED), advance])


def _work_on_ray_node(params_path: str, cwd: str, handle: StudyHandle, task: str, backbone: str,
                      threads: int) -> str:
    """One Optuna worker as a Ray task (runs on whichever node Ray placed it); returns its worker id."""
    import ray

    from transferbench.config import load_settings

    os.chdir(cwd)  # params' relative paths are relative to the project, on storage every node shares
    torch.set_num_threads(threads)
    os.environ[RAY_NODE_ENV] = ray.get_runtime_context().get_node_id()  # recorded on each trial
    work(load_settings(params_path), handle, task=task, backbone=backbone)
    return worker_id()


def run_workers_on_ray(settings: Settings, handle: StudyHandle, *, task: str, backbone: str, workers: int,
                       params_path: str | Path, address: str) -> list[str]:
    """``workers`` Optuna workers as Ray tasks on the cluster at ``address`` (one per node where they fit).

    Each task reserves ``ray.cpus_per_worker`` CPUs and is placed with the SPREAD strategy; a task
    whose process dies is retried by Ray (``ray.max_failures`` times), and the retry re-queues the
    dead trial (``reclaim_dead_trials`` on the same host, the storage heartbeat elsewhere). Needs
    the project directory and the Optuna storage reachable from every node.
    """
    import ray

    connect(address)
    env = {k: os.environ[k] for k in FORWARDED_ENV if os.environ.get(k)}
    threads = max(1, int(settings.ray.cpus_per_worker))
    remote = ray.remote(_work_on_ray_node).options(
        num_cpus=settings.ray.cpus_per_worker, num_gpus=1 if settings.ray.use_gpu else 0,
        scheduling_strategy="SPREAD",
        max_retries=max(settings.ray.max_failures, 0), retry_exceptions=False,
        runtime_env={"env_vars": {**env, "OMP_NUM_THREADS": str(threads)}})
    refs = [remote.remote(str(Path(params_path).resolve()), os.getcwd(), handle, task, backbone, threads)
            for _ in range(workers)]
    try:
        return ray.get(refs)
    except ray.exceptions.RayError as exc:
        raise TransferbenchError(f"sensitivity workers on the Ray cluster at {address} failed: {exc}") from exc


def run_workers(settings: Settings, handle: StudyHandle, *, task: str, backbone: str, workers: int,
                params_path: str | Path) -> None:
    """Run ``workers`` Optuna workers on the study: this process (1), Ray tasks on the configured
    cluster (``ray.address`` / ``$RAY_ADDRESS``), or as many child processes on this machine."""
    if workers <= 1:
        work(settings, handle, task=task, backbone=backbone)
        return
    address = configured_address(settings.ray.address)
    if address:
        run_workers_on_ray(settings, handle, task=task, backbone=backbone, workers=workers, params_path=params_path,
                           address=address)
        return
    threads = max(1, (os.cpu_count() or 1) // workers)
    # one terminal, several workers: their bars would overwrite one another's line
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), PROGRESS_ENV: "0"}
    command = [sys.executable, "-m", "transferbench.cli", "--params", str(params_path), "sensitivity",
               "--task", task, "--backbone", backbone, "--worker-only"]
    children = [subprocess.Popen(command, env=env) for _ in range(workers)]
    failed = [c.args for c in children if c.wait() != 0]
    if failed:
        raise TransferbenchError(f"{len(failed)} of {workers} sensitivity workers failed (see their output above)")
