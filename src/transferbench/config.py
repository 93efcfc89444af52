"""params.yaml -> typed, frozen settings: the one source of truth for the study.

Every section of ``params.yaml`` maps onto one frozen dataclass below. Loading
rejects unknown keys (with a "did you mean" hint), wrong types and
out-of-range values, always naming the dotted key at fault and what is allowed,
so a typo fails at load rather than silently falling back to a default.

Field constraints live in the field metadata (``bounded``/``choice`` below), so
the allowed values are declared once, next to the field, and reported in the
error. Cross-field rules (e.g. a range whose low is above its high) live in
``__post_init__`` and raise ``ConfigError`` with the key names.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from transferbench.errors import TransferbenchError

DEFAULT_PARAMS = Path("params.yaml")


class ConfigError(TransferbenchError, ValueError):
    """A params.yaml problem; the message names the dotted key at fault."""


def bounded(default: Any = dataclasses.MISSING, *, ge: float | None = None, gt: float | None = None,
            le: float | None = None, lt: float | None = None, **kwargs: Any) -> Any:
    """A dataclass field whose numeric value must lie in a range (checked at load)."""
    limits = {name: value for name, value in (("ge", ge), ("gt", gt), ("le", le), ("lt", lt)) if value is not None}
    if isinstance(default, (list, dict, set)):
        return field(default_factory=lambda: default, metadata={"limits": limits}, **kwargs)
    return field(default=default, metadata={"limits": limits}, **kwargs)


_LIMIT_TEXT = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<"}
_LIMIT_CHECK = {
    "ge": lambda v, b: v >= b,
    "gt": lambda v, b: v > b,
    "le": lambda v, b: v <= b,
    "lt": lambda v, b: v < b,
}


def _fail(where: str, message: str) -> typing.NoReturn:
    raise ConfigError(f"params key '{where}': {message}")


def _describe(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if dataclasses.is_dataclass(tp):
        return f"a mapping ({tp.__name__})"
    return getattr(tp, "__name__", str(tp))


def _convert(tp: Any, value: Any, where: str) -> Any:
    """Convert a YAML value to the annotated type ``tp``, or fail naming ``where``."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for option in (a for a in args if a is not type(None)):
            try:
                return _convert(option, value, where)
            except ConfigError as exc:
                errors.append(str(exc))
        _fail(where, f"expected {' or '.join(_describe(a) for a in args)}, got {value!r}")
    if origin is Literal:
        if value not in args:
            _fail(where, f"{value!r} is not allowed; allowed values: {', '.join(repr(a) for a in args)}")
        return value
    if dataclasses.is_dataclass(tp):
        return build(tp, value, where)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            _fail(where, f"expected a list, got {type(value).__name__} {value!r}")
        item_type = args[0] if args else Any
        return tuple(_convert(item_type, item, f"{where}[{i}]") for i, item in enumerate(value))
    if origin in (dict, Mapping):
        if not isinstance(value, Mapping):
            _fail(where, f"expected a mapping, got {type(value).__name__} {value!r}")
        key_type, item_type = args if args else (str, Any)
        return types.MappingProxyType(
            {_convert(key_type, k, where): _convert(item_type, v, f"{where}.{k}") for k, v in value.items()})
    if tp is bool:
        if not isinstance(value, bool):
            _fail(where, f"expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            _fail(where, f"expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            _fail(where, f"expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            _fail(where, f"expected a string, got {value!r}")
        return value
    raise TypeError(f"unsupported settings type {tp!r} at {where}")


def _check_limits(value: Any, limits: Mapping[str, float], where: str) -> None:
    if not limits or value is None:
        return
    values = value if isinstance(value, tuple) else (value,)
    for v in values:
        for name, bound in limits.items():
            if not _LIMIT_CHECK[name](v, bound):
                allowed = " and ".join(f"{_LIMIT_TEXT[n]} {b}" for n, b in limits.items())
                _fail(where, f"{v!r} is out of range; allowed: {allowed}")


def build(cls: type, raw: Any, where: str = "") -> Any:
    """Build dataclass ``cls`` from a mapping, rejecting unknown keys and bad values."""
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        _fail(where or cls.__name__, f"expected a mapping, got {type(raw).__name__} {raw!r}")
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls) if f.init}
    prefix = f"{where}." if where else ""
    for key in raw:
        if key not in known:
            close = difflib.get_close_matches(str(key), list(known), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            _fail(f"{prefix}{key}", f"unknown key{hint}; allowed keys: {', '.join(sorted(known))}")
    kwargs = {}
    for name, spec in known.items():
        key = f"{prefix}{name}"
        if name not in raw:
            if spec.default is dataclasses.MISSING and spec.default_factory is dataclasses.MISSING:
                _fail(key, "missing required key")
            continue
        value = _convert(hints[name], raw[name], key)
        _check_limits(value, spec.metadata.get("limits", {}), key)
        kwargs[name] = value
    try:
        return cls(**kwargs)
    except ConfigError as exc:
        if where and not str(exc).startswith(f"params key '{where}"):
            raise ConfigError(str(exc).replace("params key '", f"params key '{prefix}", 1)) from None
        raise


# --------------------------------------------------------------------------- study
@dataclass(frozen=True)
class StudySettings:
    """Which tasks x backbones x seeds the study runs (PROTOCOL.md: 3 seeds, mean reported)."""

    name: str
    tasks: tuple[str, ...]
    backbones: tuple[str, ...]
    seeds: tuple[int, ...] = bounded((0, 1, 2), ge=0)

    def __post_init__(self) -> None:
        for key in ("tasks", "backbones", "seeds"):
            items = getattr(self, key)
            if not items:
                raise ConfigError(f"params key 'study.{key}': must list at least one entry")
            if len(set(items)) != len(items):
                raise ConfigError(f"params key 'study.{key}': entries must be unique, got {list(items)}")


# --------------------------------------------------------------------------- data
@dataclass(frozen=True)
class SyntheticSettings:
    """The generated dataset for unit tests and the CI smoke study (transferbench.data.synthetic)."""

    # One class per shape drawn; every group (a synthetic "individual") draws one class.
    classes: tuple[str, ...] = ("circle", "square", "triangle")
    groups: int = bounded(36, ge=3)
    images_per_group: int = bounded(4, ge=1)
    image_size: int = bounded(64, ge=16, le=512)
    # Draw each class in its own hue (jittered) as well as its own shape: an easy cue, so that
    # random-init tiny models learn the task within a smoke budget (false: random colours).
    class_hue: bool = False
    # Free-text locations in the COVID-19 metadata style ("City, Country"); groups cycle through them.
    locations: tuple[str, ...] = ("Sydney, Australia", "Boston, USA", "Toronto, Canada", "Cairo, Egypt",
                                  "Milan, Italy", "Tokyo, Japan")
    seed: int = bounded(0, ge=0)

    def __post_init__(self) -> None:
        if len(self.classes) < 2 or len(set(self.classes)) != len(self.classes):
            raise ConfigError(f"params key 'classes': need at least two unique class names, got {list(self.classes)}")
        if not self.locations:
            raise ConfigError("params key 'locations': must list at least one location")


@dataclass(frozen=True)
class DataSettings:
    """Where raw data, generated data, split manifests and reports live (all git-ignored paths)."""

    raw_dir: str = "data/raw"
    # Datasets generated by a dvc stage (synthetic); kept outside raw_dir, which data.dvc tracks.
    generated_dir: str = "data/generated"
    splits_dir: str = "data/splits"
    cache_dir: str = "data/cache"
    reports_dir: str = "reports"
    # Smallest side (px) an image must have to pass the split checks and validation.
    min_image_side: int = bounded(32, ge=1)
    # Validation warns (does not fail) when a split has fewer rows than this.
    min_split_rows: int = bounded(20, ge=0)
    # Region -> countries, as the country appears last in a free-text location (matched
    # case-insensitively). The geographic split assigns regions, never raw countries.
    regions: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    synthetic: SyntheticSettings = field(default_factory=SyntheticSettings)

    def __post_init__(self) -> None:
        seen: dict[str, str] = {}
        for region, countries in self.regions.items():
            for country in countries:
                key = country.strip().casefold()
                if key in seen:
                    raise ConfigError(f"params key 'regions.{region}': country {country!r} is already listed "
                                      f"under 'regions.{seen[key]}'; a country belongs to one region")
                seen[key] = region

    def region_of(self, country: str) -> str | None:
        """The region a country belongs to, or None when the table does not list it."""
        key = country.strip().casefold()
        for region, countries in self.regions.items():
            if any(key == c.strip().casefold() for c in countries):
                return region
        return None


@dataclass(frozen=True)
class TaskOptions:
    """Which rows of a dataset a task keeps and how it names their labels."""

    # The label vocabulary; a label outside it is quarantined. Empty: whatever labels occur.
    classes: tuple[str, ...] = ()
    # Keep only these imaging modalities / views (columns `modality` / `view`); empty keeps all.
    modalities: tuple[str, ...] = ()
    views: tuple[str, ...] = ()
    # Binary task: label = positive_finding when the dataset label contains it
    # (e.g. "COVID-19, ARDS"), negative_label otherwise. null keeps the dataset's labels.
    positive_finding: str | None = None
    negative_label: str = "other"


@dataclass(frozen=True)
class GeographicRule:
    """PROTOCOL.md, COVID-19: train = Australia and America, val = Africa, test = every other location."""

    train_regions: tuple[str, ...] = ("Oceania", "Americas")
    val_regions: tuple[str, ...] = ("Africa",)
    # "americas": America means the Americas (default). "usa": only the USA counts as
    # America; other countries of the Americas region then go to test.
    america: Literal["americas", "usa"] = "americas"
    # Rows whose location is empty or not in data.regions: "exclude" (counted in the
    # summary and listed in quarantine.csv) or "test".
    unknown_location: Literal["exclude", "test"] = "exclude"

    def __post_init__(self) -> None:
        overlap = set(self.train_regions) & set(self.val_regions)
        if overlap:
            raise ConfigError(f"params key 'val_regions': {sorted(overlap)} also listed in 'train_regions'")


@dataclass(frozen=True)
class SplitSettings:
    """How a task is split (PROTOCOL.md, "Tasks and splits"); only the chosen rule's keys are read."""

    rule: Literal["geographic", "random", "official", "by_group"]
    seed: int = bounded(0, ge=0)
    # random (Flower102, Caltech101, WikiArt, NYU): train/val/test fractions of the groups.
    fractions: tuple[float, ...] = bounded((0.8, 0.1, 0.1), ge=0, le=1)
    # official (CUB200, Indoor67): this fraction of the official train groups becomes val.
    val_fraction: float = bounded(0.1, gt=0, lt=1)
    # by_group (FG-NET): this many groups (individuals) go to test and to val; the rest train.
    test_groups: int = bounded(5, ge=1)
    val_groups: int = bounded(3, ge=1)
    geographic: GeographicRule = field(default_factory=GeographicRule)

    def __post_init__(self) -> None:
        if len(self.fractions) != 3 or abs(sum(self.fractions) - 1.0) > 1e-6:
            raise ConfigError(f"params key 'fractions': expected three fractions [train, val, test] summing to 1, "
                              f"got {list(self.fractions)}")


@dataclass(frozen=True)
class TaskSettings:
    """One downstream task: which dataset it reads, which rows it keeps and how it is split."""

    dataset: str
    split: SplitSettings
    # Metric used for model selection and ranking; higher is better unless listed in
    # transferbench.evaluation as lower-is-better (e.g. mae).
    metric: str = "accuracy"
    options: TaskOptions = field(default_factory=TaskOptions)


# --------------------------------------------------------------------------- models
@dataclass(frozen=True)
class TunedHyperparameters:
    """A backbone's tuned learning rate and warm-up (written by `transferbench sensitivity-report`)."""

    lr: float = bounded(gt=0)
    warmup_iters: int = bounded(ge=0)
    warmup_lr: float = bounded(gt=0)


@dataclass(frozen=True)
class BackboneSettings:
    """One entry of the backbone catalogue (PROTOCOL.md, "Backbones")."""

    model: str
    family: Literal["convnet", "transformer"]
    # hub (timm pretrained weights), file:<path> (local checkpoint) or none (random init).
    weights: str = "hub"
    preset: Literal["paper", "small", "tiny"] = "small"
    # Input side in px; null means the protocol's finetune.img_size.
    img_size: int | None = bounded(None, ge=16)
    imagenet_top1: float | None = bounded(None, ge=0, le=100)
    # Used instead of finetune.lr/warmup_iters/warmup_lr when finetune.hyperparameters is "tuned".
    tuned: TunedHyperparameters | None = None

    def __post_init__(self) -> None:
        if self.weights not in ("hub", "none") and not (self.weights.startswith("file:") and len(self.weights) > 5):
            raise ConfigError(
                f"params key 'weights': {self.weights!r} is not allowed; allowed values: 'hub', 'none', 'file:<path>'")


# --------------------------------------------------------------------------- training
@dataclass(frozen=True)
class FinetuneSettings:
    """The paper's fine-tuning protocol (PROTOCOL.md); defaults are the paper's values."""

    mode: Literal["full", "linear_probe"] = "full"
    head_dropout: float = bounded(0.2, ge=0, lt=1)
    adam_betas: tuple[float, ...] = bounded((0.9, 0.999), ge=0, lt=1)
    weight_decay: float = bounded(1e-6, ge=0)
    warmup_iters: int = bounded(200, ge=0)
    warmup_lr: float = bounded(1e-6, gt=0)
    lr: float = bounded(1e-4, gt=0)
    plateau_patience: int = bounded(3, ge=0)
    plateau_factor: float = bounded(0.5, gt=0, lt=1)
    early_stop_patience: int = bounded(10, ge=1)
    max_epochs: int = bounded(100, ge=1)
    label_smoothing: float = bounded(0.1, ge=0, lt=1)
    rotation_degrees: float = bounded(30.0, ge=0, le=180)
    hflip: bool = True
    img_size: int = bounded(224, ge=16)
    # The global batch: with N Ray Train workers each takes batch_size // N.
    batch_size: int = bounded(32, ge=1)
    # Batch size for val/test inference (no gradients, so it can be larger).
    eval_batch_size: int = bounded(64, ge=1)
    # paper: lr/warmup_iters/warmup_lr above for every backbone. tuned: each backbone's
    # backbones.<b>.tuned (from the sensitivity study); runs are tagged with which was used.
    hyperparameters: Literal["paper", "tuned"] = "paper"

    def __post_init__(self) -> None:
        if len(self.adam_betas) != 2:
            raise ConfigError(f"params key 'adam_betas': expected two values [beta1, beta2], got {list(self.adam_betas)}")


@dataclass(frozen=True)
class RaySettings:
    """Ray cluster and Ray Train scaling; only these change between a laptop and a cluster."""

    # null: start a local cluster (or honour RAY_ADDRESS); otherwise e.g. "ray://host:10001" or "auto".
    # Not read in local mode (num_workers 0), which starts or joins no cluster.
    address: str | None = None
    # 0: Ray Train local mode, the training function in the calling process (no cluster, no
    # actors, no DDP); >= 1: that many Ray Train worker actors (DDP across them).
    num_workers: int = bounded(0, ge=0)
    # Elastic training: null = exactly num_workers; otherwise Ray Train runs with between
    # min_workers and num_workers workers, so a run that loses a node goes on with fewer.
    min_workers: int | None = bounded(None, ge=1)
    # Placement group strategy of the workers: PACK fills a node first, SPREAD prefers
    # different nodes, STRICT_* insist (Ray's placement-group strategies).
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    use_gpu: bool = False
    cpus_per_worker: float = bounded(1.0, gt=0)
    max_failures: int = bounded(2, ge=-1)
    # Where Ray Train keeps checkpoints: a path every node of a cluster mounts (not an s3:// URI).
    storage_path: str = "data/ray_results"
    # Checkpoints kept by val loss (the latest one is always kept too, for recovery).
    checkpoints_to_keep: int = bounded(1, ge=1)
    # Seconds between the Ray Train controller's polls of its workers (Ray's
    # RAY_TRAIN_HEALTH_CHECK_INTERVAL_S, default 2). ray.train.report waits for the previous
    # epoch's report to be collected, so epochs shorter than this wait for the poll.
    report_interval_s: float = bounded(0.2, gt=0)
    # On GPU only: bf16 autocast, and channels-last memory format for ConvNets.
    mixed_precision: bool = True
    channels_last: bool = True
    # DataLoader processes per Ray worker (the train and the val loader each get this many, kept for
    # the run), decoding nothing (the cache is decoded once) but cropping, rotating, flipping and
    # normalising every image. 0: in the training process, right on CPU, where the step already uses
    # the worker's cores. On GPU augmentation must keep up with the step: on an H100 one process made
    # 633-702 img/s for steps that take 838-1060 (ResNet-50, ViT-B/16); give it cpus_per_worker - 1.
    loader_workers: int = bounded(0, ge=0)

    def __post_init__(self) -> None:
        if self.local_mode and self.min_workers is not None:
            raise ConfigError("params key 'ray.min_workers': elastic training needs Ray Train workers; "
                              "it must be null when ray.num_workers is 0 (local mode)")
        if self.min_workers is not None and self.min_workers > self.num_workers:
            raise ConfigError(f"params key 'ray.min_workers': {self.min_workers} is more than "
                              f"ray.num_workers ({self.num_workers})")
        if "://" in self.storage_path:  # Path() would make "s3://b/x" a local directory named "s3:"
            raise ConfigError(f"params key 'ray.storage_path': {self.storage_path!r} is a URI; transferbench keeps "
                              "each run's completion marker and MLflow run id beside its checkpoints, so it needs "
                              "a path that every node mounts (NFS, EFS, a local disk on one machine)")

    @property
    def local_mode(self) -> bool:
        """Ray Train local mode: the fine-tune runs in the calling process, with no Ray cluster."""
        return self.num_workers == 0

    @property
    def scaling_workers(self) -> int | tuple[int, int]:
        """``ScalingConfig.num_workers``: a fixed count, or (min, max) for elastic training."""
        if self.min_workers is None or self.min_workers == self.num_workers:
            return self.num_workers
        return (self.min_workers, self.num_workers)


@dataclass(frozen=True)
class TrackingSettings:
    """MLflow: the embedded SQLite store unless MLFLOW_TRACKING_URI says otherwise."""

    tracking_uri: str = "sqlite:///mlruns.db"
    artifact_location: str = "mlartifacts"
    experiment: str = "transferbench"
    # CPU/GPU/memory metrics of the rank-0 worker, sampled while it trains.
    system_metrics: bool = True
    # Log the best model with mlflow.pytorch (signature + input example).
    log_model: bool = True


# --------------------------------------------------------------------------- evaluation
@dataclass(frozen=True)
class CompareSettings:
    """Rank tables, significance analysis and the drift gate (PROTOCOL.md, "What the results look like")."""

    # One metrics JSON per (task, backbone, seed): <metrics_dir>/<task>/<backbone>/seed<S>.json.
    metrics_dir: str = "metrics/finetune"
    # The committed rank table that `transferbench compare --baseline` checks against.
    baseline: str = "baselines/smoke_rank_table.json"
    # Drift gate: a per-task mean metric that moves by more than this (absolute, in the
    # metric's own units) AND by more than the seeds' spread is drift. Rank changes always are.
    metric_tolerance: float = bounded(0.05, ge=0)
    # Friedman / Nemenyi significance level.
    alpha: float = bounded(0.05, gt=0, lt=1)
    # Learning floors of the drift gate: task -> the score the best backbone of EVERY family must
    # reach on it (at most, for lower-is-better metrics), so a study that stopped learning fails the
    # gate by name instead of showing only as rank "drift". Empty: no floor.
    learning_floors: Mapping[str, float] = field(default_factory=dict)


# --------------------------------------------------------------------------- tuning
@dataclass(frozen=True)
class FloatRange:
    """A search range; ``log`` samples log-uniformly (both bounds must then be > 0)."""

    low: float
    high: float
    log: bool = False


@dataclass(frozen=True)
class IntRange:
    low: int = bounded(ge=0)
    high: int = bounded(ge=0)


@dataclass(frozen=True)
class SearchSpace:
    """What the sensitivity study varies; every other protocol value stays fixed."""

    lr: FloatRange = field(default_factory=lambda: FloatRange(1e-6, 1e-2, log=True))
    warmup_iters: IntRange = field(default_factory=lambda: IntRange(0, 3000))
    warmup_lr: FloatRange = field(default_factory=lambda: FloatRange(1e-8, 1e-4, log=True))

    def __post_init__(self) -> None:
        for key in ("lr", "warmup_iters", "warmup_lr"):
            space = getattr(self, key)
            if space.low > space.high:
                raise ConfigError(f"params key '{key}': low {space.low!r} > high {space.high!r}")
        for key in ("lr", "warmup_lr"):
            space = getattr(self, key)
            if space.low <= 0:
                scale = "on a log scale" if space.log else "for a learning rate"
                raise ConfigError(f"params key '{key}': low {space.low!r} must be > 0 {scale}")


@dataclass(frozen=True)
class PrunerSettings:
    """Stops hopeless trials from the val metric reported every epoch."""

    kind: Literal["median", "hyperband", "none"] = "median"
    # median: prune below the median of earlier trials at the same epoch, once this many
    # trials finished and after this many epochs of the trial.
    n_startup_trials: int = bounded(4, ge=0)
    n_warmup_steps: int = bounded(1, ge=0)
    # hyperband: resources are epochs (max: sensitivity.max_epochs).
    min_resource: int = bounded(1, ge=1)
    reduction_factor: int = bounded(3, ge=2)


@dataclass(frozen=True)
class SensitivitySettings:
    """How much do lr and warm-up choices move the ranking? (PROTOCOL.md, "Sensitivity"; Optuna)."""

    # The tasks x backbones the dvc stage fans out over.
    tasks: tuple[str, ...] = ()
    backbones: tuple[str, ...] = ()
    # Finished (complete or pruned) trials per (task, backbone); trial 0 is the fixed protocol choice.
    n_trials: int = bounded(12, ge=2)
    # Per-trial budget; every other protocol value is finetune's.
    max_epochs: int = bounded(6, ge=1)
    # qmc (scrambled Sobol): trial i has the same configuration for every backbone. tpe | random.
    sampler: Literal["qmc", "tpe", "random"] = "qmc"
    # Seeds the sampler, the model initialisation and the data order of every trial.
    seed: int = bounded(0, ge=0)
    pruner: PrunerSettings = field(default_factory=PrunerSettings)
    # Optuna storage: any SQLAlchemy URL (shared study) or the embedded SQLite file; $OPTUNA_STORAGE overrides.
    storage: str = "sqlite:///data/optuna/sensitivity.db"
    # A worker that has not sent a heartbeat for grace_period seconds is dead: its trial is retried.
    heartbeat_interval: int = bounded(10, ge=1)
    grace_period: int = bounded(60, ge=2)
    # PED-ANOVA: importance for reaching the top this fraction of trials.
    ped_anova_quantile: float = bounded(0.25, gt=0, lt=1)
    reports_dir: str = "reports/sensitivity"
    space: SearchSpace = field(default_factory=SearchSpace)

    def __post_init__(self) -> None:
        for key in ("tasks", "backbones"):
            items = getattr(self, key)
            if len(set(items)) != len(items):
                raise ConfigError(f"params key '{key}': entries must be unique, got {list(items)}")
        if self.grace_period <= self.heartbeat_interval:
            raise ConfigError(f"params key 'grace_period': {self.grace_period} must exceed heartbeat_interval "
                              f"{self.heartbeat_interval}")


# --------------------------------------------------------------------------- root
@dataclass(frozen=True)
class Settings:
    """The whole params.yaml."""

    study: StudySettings
    data: DataSettings = field(default_factory=DataSettings)
    tasks: Mapping[str, TaskSettings] = field(default_factory=dict)
    backbones: Mapping[str, BackboneSettings] = field(default_factory=dict)
    finetune: FinetuneSettings = field(default_factory=FinetuneSettings)
    ray: RaySettings = field(default_factory=RaySettings)
    tracking: TrackingSettings = field(default_factory=TrackingSettings)
    compare: CompareSettings = field(default_factory=CompareSettings)
    sensitivity: SensitivitySettings = field(default_factory=SensitivitySettings)

    def __post_init__(self) -> None:
        for section in ("study", "sensitivity"):
            for key, catalogue in (("tasks", self.tasks), ("backbones", self.backbones)):
                for name in getattr(getattr(self, section), key):
                    if name not in catalogue:
                        raise ConfigError(
                            f"params key '{section}.{key}': {name!r} is not defined under '{key}'; "
                            f"allowed values: {', '.join(sorted(catalogue))}")
        for name in self.compare.learning_floors:
            if name not in self.tasks:
                raise ConfigError(f"params key 'compare.learning_floors.{name}': {name!r} is not defined under "
                                  f"'tasks'; allowed values: {', '.join(sorted(self.tasks))}")
        if self.finetune.hyperparameters == "tuned":
            for name in self.study.backbones:
                self.finetune_for(name)
        for name, task in self.tasks.items():
            rule = task.split.geographic
            for key in ("train_regions", "val_regions"):
                unknown = [r for r in getattr(rule, key) if r not in self.data.regions]
                if task.split.rule == "geographic" and unknown:
                    raise ConfigError(f"params key 'tasks.{name}.split.geographic.{key}': {unknown} not defined "
                                      f"under 'data.regions'; allowed values: {', '.join(self.data.regions)}")

    def task(self, name: str) -> TaskSettings:
        if name not in self.tasks:
            raise ConfigError(f"unknown task {name!r}; defined tasks: {', '.join(sorted(self.tasks))}")
        return self.tasks[name]

    def backbone(self, name: str) -> BackboneSettings:
        if name not in self.backbones:
            raise ConfigError(f"unknown backbone {name!r}; defined backbones: {', '.join(sorted(self.backbones))}")
        return self.backbones[name]

    def finetune_for(self, backbone: str) -> FinetuneSettings:
        """The protocol ``backbone`` trains with: finetune's, or its tuned lr and warm-up."""
        protocol = self.finetune
        if protocol.hyperparameters == "paper":
            return protocol
        tuned = self.backbone(backbone).tuned
        if tuned is None:
            raise ConfigError(
                f"params key 'backbones.{backbone}.tuned': missing, but finetune.hyperparameters is 'tuned'; "
                f"set it from reports/sensitivity/<task>/best_params.json (`transferbench sensitivity-report`)")
        return dataclasses.replace(protocol, lr=tuned.lr, warmup_iters=tuned.warmup_iters, warmup_lr=tuned.warmup_lr)


def load_settings(path: str | Path = DEFAULT_PARAMS) -> Settings:
    """Load and validate ``params.yaml``; raise ``ConfigError`` naming the key at fault."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"params file not found: {path}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"params file {path} is not valid YAML: {exc}") from None
    return build(Settings, raw)
