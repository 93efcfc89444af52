"""params.yaml -> typed, frozen settings: the one source of truth for the study.

Every section of ``params.yaml`` is a frozen pydantic model (``extra="forbid"``) below, and each
component is handed its own section (the loop gets ``FinetuneSettings``, the Ray driver
``RaySettings``, the tracker ``TrackingSettings``). Loading rejects unknown keys (with a "did you
mean" hint), wrong types (strictly: ``true`` is not an integer, a quoted ``"1e-3"`` is not a number; a
plain ``1e-3`` is, as in YAML 1.2) and out-of-range values, naming the dotted key at fault and what is allowed.
"""

from __future__ import annotations

import difflib
import re
import types
import typing
from collections.abc import Collection
from pathlib import Path
from typing import Annotated, Any, Literal

import annotated_types
import yaml
from pydantic import (BaseModel, ConfigDict, Field, Strict, ValidationError, ValidationInfo, field_validator,
                      model_validator)
from pydantic_core import PydanticCustomError

from transferbench.errors import TransferbenchError

DEFAULT_PARAMS = Path("params.yaml")


class ConfigError(TransferbenchError, ValueError):
    """A params.yaml problem; the message names the dotted key at fault."""


# Strict scalars: YAML's true/1/"1" stay what they are, never silently converted.
Int = Annotated[int, Strict()]
Float = Annotated[float, Strict()]  # an integer is a valid float
Bool = Annotated[bool, Strict()]
Str = Annotated[str, Strict()]
NonNegInt = Annotated[int, Strict(), Field(ge=0)]
PositiveInt = Annotated[int, Strict(), Field(ge=1)]
PositiveFloat = Annotated[float, Strict(), Field(gt=0)]
Fraction = Annotated[float, Strict(), Field(ge=0, le=1)]


# How a task's backbone is trained: the whole network, or a linear head on the frozen backbone (the
# paper's linear evaluation). A study dimension: study.modes, or a task's own modes.
Mode = Literal["full", "linear_probe"]
# The paper's tables (PROTOCOL.md, "Paper tables by task group"); linear evaluation is a group of its own.
Group = Literal["fine-grained", "scene", "open-domain", "in-domain", "face", "retrieval", "multi-task"]


def invalid(key: str, message: str) -> PydanticCustomError:
    """A cross-field rule's failure, for ``key`` (relative to the model that checks it)."""
    return PydanticCustomError("transferbench", "{message}", {"key": key, "message": message})


class Section(BaseModel):
    """A frozen settings section: unknown keys are refused."""

    model_config = ConfigDict(frozen=True, extra="forbid")


# --------------------------------------------------------------------------- study
class StudySettings(Section):
    """Which tasks x backbones x modes x seeds the study runs (PROTOCOL.md: 3 seeds, mean reported)."""

    name: Str
    # Tasks whose backbones are trained (fine-tuned or linearly probed), one stage per task x backbone; empty
    # only in a retrieval-only study.
    tasks: tuple[Str, ...]
    backbones: tuple[Str, ...]
    seeds: tuple[NonNegInt, ...] = (0, 1, 2)
    # Training modes of every task that lists none of its own (tasks.<task>.modes).
    modes: tuple[Mode, ...] = ("full",)
    # Tasks of kind retrieval: features of the backbones as they are, no training, no seeds.
    retrieval_tasks: tuple[Str, ...] = ()
    # Tasks of kind multitask: one backbone trained on the tasks it combines (its components, which
    # must be in study.tasks: each result is also read against their single-task results).
    multitask_tasks: tuple[Str, ...] = ()

    @model_validator(mode="after")
    def _non_empty_and_unique(self) -> StudySettings:
        if not self.tasks and not self.retrieval_tasks:  # a retrieval-only study (paper Table 8) trains nothing
            raise invalid("tasks", "the study evaluates nothing: list at least one task under study.tasks (trained) "
                                   "or study.retrieval_tasks (retrieval)")
        for key in ("tasks", "backbones", "seeds", "modes", "retrieval_tasks", "multitask_tasks"):
            items = getattr(self, key)
            if not items and key in ("backbones", "seeds", "modes"):
                raise invalid(key, "must list at least one entry")
            if len(set(items)) != len(items):
                raise invalid(key, f"entries must be unique, got {list(items)}")
        for key in ("retrieval_tasks", "multitask_tasks"):
            both = set(self.tasks) & set(getattr(self, key))
            if both:
                raise invalid(key, f"{sorted(both)} also listed in study.tasks")
        return self


# --------------------------------------------------------------------------- data
class SyntheticSettings(Section):
    """The generated dataset for unit tests and the CI smoke study (transferbench.data.synthetic)."""

    # One class per shape drawn; every group (a synthetic "individual") draws one class.
    classes: tuple[Str, ...] = ("circle", "square", "triangle")
    groups: Annotated[int, Strict(), Field(ge=3)] = 36
    images_per_group: PositiveInt = 4
    image_size: Annotated[int, Strict(), Field(ge=16, le=512)] = 64
    # Draw each class in its own hue (jittered) as well as its own shape: an easy cue, so that
    # random-init tiny models learn the task within a smoke budget (false: random colours).
    class_hue: Bool = False
    # The noise behind the shapes: dark (the default) or light, so that two generated domains differ at a
    # glance (data.synthetic_b, the second domain of the mixed multi-task case, draws it light).
    background: Literal["dark", "light"] = "dark"
    # Free-text locations in the COVID-19 metadata style ("City, Country"); groups cycle through them.
    locations: tuple[Str, ...] = ("Sydney, Australia", "Boston, USA", "Toronto, Canada", "Cairo, Egypt",
                                  "Milan, Italy", "Tokyo, Japan")
    seed: NonNegInt = 0

    @model_validator(mode="after")
    def _classes_and_locations(self) -> SyntheticSettings:
        if len(self.classes) < 2 or len(set(self.classes)) != len(self.classes):
            raise invalid("classes", f"need at least two unique class names, got {list(self.classes)}")
        if not self.locations:
            raise invalid("locations", "must list at least one location")
        return self


class SyntheticAgeSettings(Section):
    """The generated age task of the smoke study (transferbench.data.synthetic_age): the age drawn into the image."""

    individuals: Annotated[int, Strict(), Field(ge=3)] = 24
    images_per_individual: PositiveInt = 6
    max_age: PositiveInt = 69
    image_size: Annotated[int, Strict(), Field(ge=16, le=512)] = 64
    seed: NonNegInt = 0


class SyntheticDenseSettings(Section):
    """The generated dense task (transferbench.data.synthetic_dense): shapes at depths, in NYU Depth V2's layout."""

    images: PositiveInt = 96
    # One class per shape drawn; the mask numbers them 2..len(classes)+1 after the background (1), so a
    # task on this data has dense.num_classes = len(classes) + 1.
    classes: tuple[Literal["circle", "square", "triangle", "diamond", "cross"], ...] = ("circle", "square", "triangle")
    image_size: Annotated[int, Strict(), Field(ge=16, le=512)] = 64
    seed: NonNegInt = 0

    @model_validator(mode="after")
    def _classes(self) -> SyntheticDenseSettings:
        if not self.classes or len(set(self.classes)) != len(self.classes):
            raise invalid("classes", f"need at least one shape, each once, got {list(self.classes)}")
        return self


class SyntheticRetrievalSettings(Section):
    """The generated retrieval task (transferbench.data.synthetic_retrieval), in Oxford5k's layout."""

    landmarks: Annotated[int, Strict(), Field(ge=2)] = 5
    views_per_landmark: Annotated[int, Strict(), Field(ge=2)] = 8
    queries_per_landmark: PositiveInt = 2
    distractors: NonNegInt = 20
    image_size: Annotated[int, Strict(), Field(ge=16, le=512)] = 64
    seed: NonNegInt = 0


class DataSettings(Section):
    """Where raw data, generated data, split manifests and reports live (all git-ignored paths)."""

    raw_dir: Str = "data/raw"
    # Datasets generated by a dvc stage (synthetic); kept outside raw_dir, which data.dvc tracks.
    generated_dir: Str = "data/generated"
    splits_dir: Str = "data/splits"
    cache_dir: Str = "data/cache"
    reports_dir: Str = "reports"
    # Smallest side (px) an image must have to pass the split checks and validation.
    min_image_side: PositiveInt = 32
    # Validation warns (does not fail) when a split has fewer rows than this.
    min_split_rows: NonNegInt = 20
    # Region -> countries, as the country appears last in a free-text location (matched
    # case-insensitively). The geographic split assigns regions, never raw countries.
    regions: dict[Str, tuple[Str, ...]] = {}
    synthetic: SyntheticSettings = SyntheticSettings()
    # The second classification domain of the mixed multi-task case: other shapes, on a light background.
    synthetic_b: SyntheticSettings = SyntheticSettings(classes=("diamond", "cross"), background="light")
    synthetic_age: SyntheticAgeSettings = SyntheticAgeSettings()
    synthetic_retrieval: SyntheticRetrievalSettings = SyntheticRetrievalSettings()
    synthetic_dense: SyntheticDenseSettings = SyntheticDenseSettings()

    @model_validator(mode="after")
    def _one_region_per_country(self) -> DataSettings:
        seen: dict[str, str] = {}
        for region, countries in self.regions.items():
            for country in countries:
                key = country.strip().casefold()
                if key in seen:
                    raise invalid(f"regions.{region}", f"country {country!r} is already listed under "
                                                       f"'regions.{seen[key]}'; a country belongs to one region")
                seen[key] = region
        return self

    def region_of(self, country: str) -> str | None:
        """The region a country belongs to, or None when the table does not list it."""
        key = country.strip().casefold()
        for region, countries in self.regions.items():
            if any(key == c.strip().casefold() for c in countries):
                return region
        return None


class TaskOptions(Section):
    """Which rows of a dataset a task keeps and how it names their labels."""

    # The label vocabulary; a label outside it is quarantined. Empty: whatever labels occur.
    classes: tuple[Str, ...] = ()
    # Keep only these imaging modalities / views (columns `modality` / `view`); empty keeps all.
    modalities: tuple[Str, ...] = ()
    views: tuple[Str, ...] = ()
    # Binary task: label = positive_finding when the dataset label contains it
    # (e.g. "COVID-19, ARDS"), negative_label otherwise. null keeps the dataset's labels.
    positive_finding: Str | None = None
    negative_label: Str = "other"


class GeographicRule(Section):
    """PROTOCOL.md, COVID-19: train = Australia and America, val = Africa, test = every other location."""

    train_regions: tuple[Str, ...] = ("Oceania", "Americas")
    val_regions: tuple[Str, ...] = ("Africa",)
    # "americas": America means the Americas (default). "usa": only the USA counts as
    # America; other countries of the Americas region then go to test.
    america: Literal["americas", "usa"] = "americas"
    # Rows whose location is empty or not in data.regions: "exclude" (counted in the
    # summary and listed in quarantine.csv) or "test".
    unknown_location: Literal["exclude", "test"] = "exclude"

    @model_validator(mode="after")
    def _disjoint(self) -> GeographicRule:
        overlap = set(self.train_regions) & set(self.val_regions)
        if overlap:
            raise invalid("val_regions", f"{sorted(overlap)} also listed in 'train_regions'")
        return self


class SplitSettings(Section):
    """How a task is split (PROTOCOL.md, "Tasks and splits"); only the chosen rule's keys are read."""

    rule: Literal["geographic", "random", "official", "by_group"]
    seed: NonNegInt = 0
    # random (Flower102, Caltech101, WikiArt, NYU): train/val/test fractions of the groups.
    fractions: tuple[Fraction, ...] = (0.8, 0.1, 0.1)
    # official (CUB200, Indoor67): this fraction of the official train groups becomes val.
    val_fraction: Annotated[float, Strict(), Field(gt=0, lt=1)] = 0.1
    # by_group (FG-NET): this many groups (individuals) go to test and to val; the rest train.
    test_groups: PositiveInt = 5
    val_groups: PositiveInt = 3
    geographic: GeographicRule = GeographicRule()

    @model_validator(mode="after")
    def _fractions(self) -> SplitSettings:
        if len(self.fractions) != 3 or abs(sum(self.fractions) - 1.0) > 1e-6:
            raise invalid("fractions", f"expected three fractions [train, val, test] summing to 1, "
                                       f"got {list(self.fractions)}")
        return self


class AgeSettings(Section):
    """Age estimation (PROTOCOL.md, "Age estimation: FG-NET"; Pan et al. 2018's mean-variance loss)."""

    max_age: PositiveInt = 69  # the softmax is over the integer ages 0..max_age
    # loss = cross-entropy + lambda_mean * (m - y)^2 / 2 + lambda_var * v, with m and v the softmax's mean
    # and variance over the ages
    lambda_mean: Annotated[float, Strict(), Field(ge=0)] = 0.2
    lambda_var: Annotated[float, Strict(), Field(ge=0)] = 0.05
    # augmentation: random affine with this rotation (degrees, either way) and x-shear
    rotation_degrees: Annotated[float, Strict(), Field(ge=0, le=180)] = 10.0
    shear_degrees: Annotated[float, Strict(), Field(ge=0, lt=90)] = 12.0


class RetrievalSettings(Section):
    """Unsupervised retrieval (PROTOCOL.md, "Unsupervised retrieval: Oxford5k")."""

    # A query's feature: of its whole image (the paper), or of the image cropped to its bounding box.
    query: Literal["image", "bbox"] = "image"
    # Images are resized to this multiple of the backbone's input side (256 for 224), then centre-cropped.
    resize_ratio: Annotated[float, Strict(), Field(ge=1, le=2)] = 256 / 224


class DenseSettings(Section):
    """Dense prediction on one image (PROTOCOL.md, "Dense tasks": NYU Depth V2 segmentation and depth).

    A dense dataset's manifest names, per image, a ``mask`` (8-bit PNG: 0 = unlabelled, ignored;
    1..num_classes = the classes) and a ``depth`` (16-bit PNG in millimetres; 0 = no reading, ignored).
    """

    num_classes: PositiveInt = 40  # NYU Depth V2's standard 40-class labels
    # The UPerNet decoder's channels (smp's decoder_channels; 512 in mmseg's UPerNet, 256 in smp's).
    decoder_channels: PositiveInt = 256
    # Depth loss (the paper names none): silog = scale-invariant log (Eigen et al. 2014) with variance
    # weight silog_lambda, as BTS/AdaBins train on NYU; l1 = mean absolute error in metres.
    depth_loss: Literal["silog", "l1"] = "silog"
    silog_lambda: Annotated[float, Strict(), Field(ge=0, le=1)] = 0.85
    # Depth range (metres) that counts: predictions are clamped to it, and ground truth outside it is invalid
    # (the usual NYU evaluation caps at 10 m).
    min_depth: PositiveFloat = 1e-3
    max_depth: PositiveFloat = 10.0

    @model_validator(mode="after")
    def _depth_range(self) -> DenseSettings:
        if self.min_depth >= self.max_depth:
            raise invalid("min_depth", f"{self.min_depth} must be below max_depth {self.max_depth}")
        return self


TaskKindName = Literal["classification", "age", "retrieval", "segmentation", "depth", "multitask"]
DENSE_KINDS = ("segmentation", "depth")


class TaskSettings(Section):
    """One downstream task: its kind, which dataset it reads, which rows it keeps and how it is split."""

    # The dataset (required but for multitask tasks, which read their components').
    dataset: Str | None = None
    # Required for the trained kinds; a retrieval task is not split (its queries are the dataset's).
    split: SplitSettings | None = None
    # The task kind (transferbench.engine.tasks): what a target is, the head, loss and metrics.
    kind: TaskKindName = "classification"
    # Metric used for model selection and ranking (one of the task kind's metrics).
    metric: Str = "accuracy"
    # The paper's table the task belongs to (rank tables by group); null: a group of its own.
    group: Group | None = None
    # The task's own seeds, training modes and backbones; null: study.seeds, study.modes, study.backbones
    # (a study backbone the task does not list gets no run on it).
    seeds: tuple[NonNegInt, ...] | None = None
    modes: tuple[Mode, ...] | None = None
    backbones: tuple[Str, ...] | None = None
    # The task's own protocol values over the finetune section's, e.g. the dense tasks' iteration-based
    # protocol ({optimizer: adamw, schedule: poly, max_iters: 20000, ...}); any finetune key but mode.
    finetune: dict[Str, Any] = {}
    options: TaskOptions = TaskOptions()
    age: AgeSettings = AgeSettings()
    retrieval: RetrievalSettings = RetrievalSettings()
    dense: DenseSettings = DenseSettings()
    # multitask: the tasks it trains together (two or more, each a trained task of the study), and the
    # weight of each one's loss in the sum (null: 1 each).
    components: tuple[Str, ...] = ()
    loss_weights: tuple[Annotated[float, Strict(), Field(ge=0)], ...] | None = None

    @model_validator(mode="after")
    def _split_seeds_modes(self) -> TaskSettings:
        if self.kind != "multitask" and self.dataset is None:
            raise invalid("dataset", f"missing (or null); a task of kind {self.kind!r} reads a dataset")
        if self.kind == "multitask" and self.dataset is not None:
            raise invalid("dataset", "a multitask task reads its components' datasets; remove this key")
        if self.kind not in ("retrieval", "multitask") and self.split is None:
            raise invalid("split", f"a task of kind {self.kind!r} needs a split rule")
        if self.kind == "multitask":
            if len(self.components) < 2 or len(set(self.components)) != len(self.components):
                raise invalid("components", f"a multitask task combines two or more distinct tasks, got "
                                            f"{list(self.components)}")
            if self.split is not None:
                raise invalid("split", "a multitask task has no split of its own: it trains on its components' splits")
            if self.loss_weights is not None and len(self.loss_weights) != len(self.components):
                raise invalid("loss_weights", f"one weight per component ({len(self.components)}), got "
                                              f"{list(self.loss_weights)}")
            if self.modes not in (None, ("full",)):
                raise invalid("modes", f"a multitask task trains the whole network (full), got {list(self.modes)}")
        elif self.components or self.loss_weights is not None:
            raise invalid("components", f"only a multitask task has components (this task's kind is {self.kind!r})")
        for key in ("seeds", "modes", "backbones"):
            items = getattr(self, key)
            if items is not None and (not items or len(set(items)) != len(items)):
                raise invalid(key, f"must list unique entries, at least one (or null), got {list(items)}")
        return self


# --------------------------------------------------------------------------- models
TUNED_PARAMETERS = ("lr", "warmup_iters", "warmup_lr")  # what the sensitivity study varies and feeds back


class TunedHyperparameters(Section):
    """A backbone's tuned learning rate and warm-up (written by `transferbench sensitivity-report`)."""

    lr: PositiveFloat
    warmup_iters: NonNegInt
    warmup_lr: PositiveFloat


class BackboneSettings(Section):
    """One entry of the backbone catalogue (PROTOCOL.md, "Backbones")."""

    model: Str
    family: Literal["convnet", "transformer"]
    # hub (timm pretrained weights), file:<path> (local checkpoint) or none (random init).
    weights: Str = "hub"
    preset: Literal["paper", "small", "tiny"] = "small"
    # Input side in px; null means the protocol's finetune.img_size.
    img_size: Annotated[int, Strict(), Field(ge=16)] | None = None
    imagenet_top1: Annotated[float, Strict(), Field(ge=0, le=100)] | None = None
    # Used instead of finetune.lr/warmup_iters/warmup_lr when finetune.hyperparameters is "tuned".
    tuned: TunedHyperparameters | None = None

    @field_validator("weights")
    @classmethod
    def _weights(cls, value: str) -> str:
        if value not in ("hub", "none") and not (value.startswith("file:") and len(value) > 5):
            message = f"{value!r} is not allowed; allowed values: 'hub', 'none', 'file:<path>'"
            raise PydanticCustomError("transferbench", "{message}", {"message": message})
        return value


# --------------------------------------------------------------------------- training
class FinetuneSettings(Section):
    """The paper's fine-tuning protocol (PROTOCOL.md); defaults are the paper's values."""

    mode: Literal["full", "linear_probe"] = "full"
    head_dropout: Annotated[float, Strict(), Field(ge=0, lt=1)] = 0.2
    adam_betas: tuple[Annotated[float, Strict(), Field(ge=0, lt=1)], ...] = (0.9, 0.999)
    weight_decay: Annotated[float, Strict(), Field(ge=0)] = 1e-6
    warmup_iters: NonNegInt = 200
    warmup_lr: PositiveFloat = 1e-6
    lr: PositiveFloat = 1e-4
    plateau_patience: NonNegInt = 3
    plateau_factor: Annotated[float, Strict(), Field(gt=0, lt=1)] = 0.5
    early_stop_patience: PositiveInt = 10
    max_epochs: PositiveInt = 100
    label_smoothing: Annotated[float, Strict(), Field(ge=0, lt=1)] = 0.1
    rotation_degrees: Annotated[float, Strict(), Field(ge=0, le=180)] = 30.0
    hflip: Bool = True
    # Where the training augmentation (crop, rotation, flip) runs: device = batched on the training device
    # after the uint8 batch is moved there (engine/augment.py), cpu = per sample in the DataLoader, auto =
    # device on CUDA and, on the CPU, the faster of the two as benchmarks/augment.py measured it (device).
    # Age's affine + shear has no batched form and stays on the CPU.
    augment: Literal["auto", "device", "cpu"] = "auto"
    img_size: Annotated[int, Strict(), Field(ge=16)] = 224
    # The global batch: with N Ray Train workers each takes batch_size // N.
    batch_size: PositiveInt = 32
    # Batch size for val/test inference (no gradients, so it can be larger).
    eval_batch_size: PositiveInt = 64
    # paper: lr/warmup_iters/warmup_lr above for every backbone. tuned: each backbone's
    # backbones.<b>.tuned (from the sensitivity study); runs are tagged with which was used.
    hyperparameters: Literal["paper", "tuned"] = "paper"
    # adam: the paper's classification optimiser; adamw: decoupled weight decay (the dense tasks').
    optimizer: Literal["adam", "adamw"] = "adam"
    # plateau: the classification protocol above (head-only warm-up, lr x plateau_factor on a stalled val
    # metric, early stop, epochs). poly: the dense protocol, counted in iterations: the whole network warms
    # up linearly from warmup_lr to lr over warmup_iters, then lr decays as (1 - t/max_iters)^poly_power to
    # 0 at max_iters; val metrics and a checkpoint every eval_every iterations; no early stop.
    schedule: Literal["plateau", "poly"] = "plateau"
    poly_power: PositiveFloat = 0.9
    max_iters: PositiveInt | None = None
    eval_every: PositiveInt = 1000

    @model_validator(mode="after")
    def _betas(self) -> FinetuneSettings:
        if len(self.adam_betas) != 2:
            raise invalid("adam_betas", f"expected two values [beta1, beta2], got {list(self.adam_betas)}")
        if self.schedule == "poly" and self.max_iters is None:
            raise invalid("max_iters", "the poly schedule counts iterations: set max_iters (the paper's dense "
                                       "tasks: 20000)")
        if self.schedule == "poly" and self.warmup_iters >= self.max_iters:
            raise invalid("warmup_iters", f"{self.warmup_iters} leaves no iteration of max_iters "
                                          f"({self.max_iters}) after the warm-up")
        return self

    @property
    def iteration_based(self) -> bool:
        return self.schedule == "poly"

    @property
    def epochs(self) -> int:
        """Evaluation rounds: epochs (plateau), or max_iters / eval_every rounds of eval_every iterations (poly)."""
        if self.schedule == "poly":
            return -(-self.max_iters // self.eval_every)
        return self.max_epochs


class RaySettings(Section):
    """Ray cluster and Ray Train scaling; only these change between a laptop and a cluster."""

    # null: start a local cluster (or honour RAY_ADDRESS); otherwise e.g. "ray://host:10001" or "auto".
    # Not read in local mode (num_workers 0), which starts or joins no cluster.
    address: Str | None = None
    # 0: Ray Train local mode, the training function in the calling process (no cluster, no
    # actors, no DDP); >= 1: that many Ray Train worker actors (DDP across them).
    num_workers: NonNegInt = 0
    # Elastic training: null = exactly num_workers; otherwise Ray Train runs with between
    # min_workers and num_workers workers, so a run that loses a node goes on with fewer.
    min_workers: PositiveInt | None = None
    # Placement group strategy of the workers: PACK fills a node first, SPREAD prefers
    # different nodes, STRICT_* insist (Ray's placement-group strategies).
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    use_gpu: Bool = False
    cpus_per_worker: PositiveFloat = 1.0
    max_failures: Annotated[int, Strict(), Field(ge=-1)] = 2
    # Where Ray Train keeps checkpoints: a path every node of a cluster mounts (not an s3:// URI).
    storage_path: Str = "data/ray_results"
    # Checkpoints kept by val loss (the latest one is always kept too, for recovery).
    checkpoints_to_keep: PositiveInt = 1
    # Seconds between the Ray Train controller's polls of its workers (Ray's
    # RAY_TRAIN_HEALTH_CHECK_INTERVAL_S, default 2). ray.train.report waits for the previous
    # epoch's report to be collected, so epochs shorter than this wait for the poll.
    report_interval_s: PositiveFloat = 0.2
    # On GPU only: bf16 autocast, and channels-last memory format for ConvNets.
    mixed_precision: Bool = True
    channels_last: Bool = True
    # torch.compile the training model (checkpoints and the logged model stay the plain module). Off by
    # default: on CPU compiling costs more than short runs gain; 1.22x the eager bare step for ViT-B/16 on an H100.
    compile: Bool = False
    # DataLoader processes per training process for the augmentation (kept for the run). 0: in the
    # training process, right on CPU, where the step already uses the cores; on GPU augmentation
    # must keep up with the step: give it about cpus_per_worker - 1 (benchmarks/README.md).
    loader_workers: NonNegInt = 0

    @model_validator(mode="after")
    def _workers_and_storage(self) -> RaySettings:
        if self.local_mode and self.min_workers is not None:
            raise invalid("min_workers", "elastic training needs Ray Train workers; it must be null when "
                                         "ray.num_workers is 0 (local mode)")
        if self.min_workers is not None and self.min_workers > self.num_workers:
            raise invalid("min_workers", f"{self.min_workers} is more than ray.num_workers ({self.num_workers})")
        if "://" in self.storage_path:  # Path() would make "s3://b/x" a local directory named "s3:"
            raise invalid("storage_path", f"{self.storage_path!r} is a URI; transferbench keeps each run's "
                                          "completion marker and MLflow run id beside its checkpoints, so it needs "
                                          "a path that every node mounts (NFS, EFS, a local disk on one machine)")
        return self

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


class TrackingSettings(Section):
    """MLflow: the embedded SQLite store unless MLFLOW_TRACKING_URI says otherwise."""

    tracking_uri: Str = "sqlite:///mlruns.db"
    artifact_location: Str = "mlartifacts"
    experiment: Str = "transferbench"
    # CPU/GPU/memory metrics of the rank-0 worker, sampled while it trains.
    system_metrics: Bool = True
    # Log the best model: the served pyfunc `serving` (images in, answers out; safetensors, what `register`
    # registers) and the raw mlflow.pytorch module `model`. Off: nothing to register.
    log_model: Bool = True


# --------------------------------------------------------------------------- evaluation
class CompareSettings(Section):
    """Rank tables, significance analysis and the drift gate (PROTOCOL.md, "What the results look like")."""

    # One metrics JSON per (task, backbone, mode, seed): <metrics_dir>/<task>/<backbone>/<mode>/seed<S>.json, the
    # run's numbers; its record (identity, lineage) at the same path under <metrics_dir>.runs.
    metrics_dir: Str = "metrics/finetune"
    # The study's numbers for `dvc metrics show` / `diff`: per family and backbone the average rank, and the
    # Friedman test's p-value (the whole table is <data.reports_dir>/rank_table.json).
    ranks_file: Str = "metrics/ranks.json"
    # The committed rank table that `transferbench compare --baseline` checks against.
    baseline: Str = "baselines/smoke_rank_table.json"
    # Drift gate: a per-task mean metric that moves by more than this (absolute, in the
    # metric's own units) AND by more than the seeds' spread is drift. Rank changes always are.
    metric_tolerance: Annotated[float, Strict(), Field(ge=0)] = 0.05
    # Friedman / Nemenyi significance level.
    alpha: Annotated[float, Strict(), Field(gt=0, lt=1)] = 0.05
    # Learning floors of the drift gate: task -> the score the best backbone of EVERY family must
    # reach on it (at most, for lower-is-better metrics), so a study that stopped learning fails the
    # gate by name instead of showing only as rank "drift". "trivial": beat the evaluation's trivial
    # baseline (predicting the training mean for age, a random ranking for retrieval). Keys are
    # evaluations: <task> (full fine-tuning, or retrieval) or <task>:linear_probe. Empty: no floor.
    learning_floors: dict[Str, Float | Literal["trivial"]] = {}


class ReportSettings(Section):
    """The study report (``reports/index.html``) and its answer with uncertainty (PROTOCOL.md, issue #23)."""

    # Where the report's links to runs point: the local `mlflow ui` default; `transferbench report --mlflow-url`
    # overrides it for one run (a shared tracking server's address, say).
    mlflow_url: Str = "http://127.0.0.1:5000"
    # Paired bootstrap of best ConvNet vs best Transformer per evaluation (resampling test images).
    bootstrap_resamples: Annotated[int, Strict(), Field(ge=100)] = 2000
    bootstrap_seed: NonNegInt = 0
    confidence: Annotated[float, Strict(), Field(gt=0, lt=1)] = 0.95


# --------------------------------------------------------------------------- tuning
class FloatRange(Section):
    """A search range; ``log`` samples log-uniformly (both bounds must then be > 0)."""

    low: Float
    high: Float
    log: Bool = False


class IntRange(Section):
    low: NonNegInt
    high: NonNegInt


class SearchSpace(Section):
    """What the sensitivity study varies (``TUNED_PARAMETERS``); every other protocol value stays fixed."""

    lr: FloatRange = FloatRange(low=1e-6, high=1e-2, log=True)
    warmup_iters: IntRange = IntRange(low=0, high=3000)
    warmup_lr: FloatRange = FloatRange(low=1e-8, high=1e-4, log=True)

    @model_validator(mode="after")
    def _ranges(self) -> SearchSpace:
        for key in TUNED_PARAMETERS:
            space = getattr(self, key)
            if space.low > space.high:
                raise invalid(key, f"low {space.low!r} > high {space.high!r}")
        for key in ("lr", "warmup_lr"):
            space = getattr(self, key)
            if space.low <= 0:
                scale = "on a log scale" if space.log else "for a learning rate"
                raise invalid(key, f"low {space.low!r} must be > 0 {scale}")
        return self


class PrunerSettings(Section):
    """Stops hopeless trials from the val metric reported every epoch."""

    kind: Literal["median", "hyperband", "none"] = "median"
    # median: prune below the median of earlier trials at the same epoch, once this many
    # trials finished and after this many epochs of the trial.
    n_startup_trials: NonNegInt = 4
    n_warmup_steps: NonNegInt = 1
    # hyperband: resources are epochs (max: sensitivity.max_epochs).
    min_resource: PositiveInt = 1
    reduction_factor: Annotated[int, Strict(), Field(ge=2)] = 3


class SensitivitySettings(Section):
    """How much do lr and warm-up choices move the ranking? (PROTOCOL.md, "Sensitivity"; Optuna)."""

    # The tasks x backbones the dvc stage fans out over.
    tasks: tuple[Str, ...] = ()
    backbones: tuple[Str, ...] = ()
    # Finished (complete or pruned) trials per (task, backbone); trial 0 is the fixed protocol choice.
    n_trials: Annotated[int, Strict(), Field(ge=2)] = 12
    # Per-trial budget; every other protocol value is finetune's.
    max_epochs: PositiveInt = 6
    # qmc (scrambled Sobol: trial i = same config for every backbone) | tpe | random.
    sampler: Literal["qmc", "tpe", "random"] = "qmc"
    # Seeds the sampler, the model initialisation and the data order of every trial.
    seed: NonNegInt = 0
    pruner: PrunerSettings = PrunerSettings()
    # Optuna storage: any SQLAlchemy URL (shared study) or the embedded SQLite file; $OPTUNA_STORAGE overrides.
    storage: Str = "sqlite:///data/optuna/sensitivity.db"
    # A worker that has not sent a heartbeat for grace_period seconds is dead: its trial is retried.
    heartbeat_interval: PositiveInt = 10
    grace_period: Annotated[int, Strict(), Field(ge=2)] = 60
    # PED-ANOVA: importance for reaching the top this fraction of trials.
    ped_anova_quantile: Annotated[float, Strict(), Field(gt=0, lt=1)] = 0.25
    reports_dir: Str = "reports/sensitivity"
    # Per task, the numbers ``dvc metrics show`` prints (<metrics_dir>/<task>.json: per backbone the fixed
    # choice's score, the best and median trial's, and how often the ranking flips); the rest is reports_dir's.
    metrics_dir: Str = "metrics/sensitivity"
    space: SearchSpace = SearchSpace()

    @model_validator(mode="after")
    def _unique_and_grace(self) -> SensitivitySettings:
        for key in ("tasks", "backbones"):
            items = getattr(self, key)
            if len(set(items)) != len(items):
                raise invalid(key, f"entries must be unique, got {list(items)}")
        if self.grace_period <= self.heartbeat_interval:
            raise invalid("grace_period", f"{self.grace_period} must exceed heartbeat_interval "
                                          f"{self.heartbeat_interval}")
        return self


# --------------------------------------------------------------------------- root
class Settings(Section):
    """The whole params.yaml."""

    study: StudySettings
    data: DataSettings = DataSettings()
    tasks: dict[Str, TaskSettings] = {}
    backbones: dict[Str, BackboneSettings] = {}
    finetune: FinetuneSettings = FinetuneSettings()
    ray: RaySettings = RaySettings()
    tracking: TrackingSettings = TrackingSettings()
    compare: CompareSettings = CompareSettings()
    report: ReportSettings = ReportSettings()
    sensitivity: SensitivitySettings = SensitivitySettings()

    @model_validator(mode="after")
    def _references(self, info: ValidationInfo) -> Settings:
        datasets = (info.context or {}).get("datasets")  # the data layer's registry, when the caller passes it
        for name, task in self.tasks.items():
            if datasets is not None and task.dataset is not None and task.dataset not in datasets:
                close = difflib.get_close_matches(task.dataset, datasets, n=1)
                hint = f" (did you mean '{close[0]}'?)" if close else ""
                raise invalid(f"tasks.{name}.dataset", f"{task.dataset!r} is not a registered dataset{hint}; "
                                                       f"allowed values: {', '.join(sorted(datasets))}")
        if "mode" in self.finetune.model_fields_set:
            raise invalid("finetune.mode", "the training mode is a study dimension: set study.modes (or a task's "
                                           "tasks.<task>.modes)")
        for name in self.study.retrieval_tasks:
            if name not in self.tasks:
                raise invalid("study.retrieval_tasks", f"{name!r} is not defined under 'tasks'; allowed values: "
                                                       f"{', '.join(sorted(self.tasks))}")
            if self.tasks[name].kind != "retrieval":
                raise invalid("study.retrieval_tasks", f"{name!r} is a {self.tasks[name].kind} task, not retrieval")
        for name in self.study.multitask_tasks:
            if name not in self.tasks:
                raise invalid("study.multitask_tasks", f"{name!r} is not defined under 'tasks'; allowed values: "
                                                       f"{', '.join(sorted(self.tasks))}")
            if self.tasks[name].kind != "multitask":
                raise invalid("study.multitask_tasks", f"{name!r} is a {self.tasks[name].kind} task, not multitask")
            for component in self.tasks[name].components:
                if component not in self.study.tasks:
                    raise invalid(f"tasks.{name}.components", f"{component!r} is not in study.tasks: a multi-task "
                                                              "result is read against its components' single-task "
                                                              "runs, so the study must train them")
        for name, task in self.tasks.items():
            for component in task.components:
                if component not in self.tasks or self.tasks[component].kind in ("retrieval", "multitask"):
                    raise invalid(f"tasks.{name}.components", f"{component!r} is not a trained single task under "
                                                              "'tasks'")
            for backbone in task.backbones or ():
                if backbone not in self.backbones:
                    raise invalid(f"tasks.{name}.backbones", f"{backbone!r} is not defined under 'backbones'")
            for key in task.finetune:
                if key not in FinetuneSettings.model_fields or key in ("mode", "hyperparameters"):
                    allowed = sorted(set(FinetuneSettings.model_fields) - {"mode", "hyperparameters"})
                    raise invalid(f"tasks.{name}.finetune.{key}", f"not a finetune key a task can set; allowed "
                                                                  f"values: {', '.join(allowed)}")
            try:
                self._protocol(self.finetune, task)
            except ValidationError as exc:
                error = exc.errors()[0]
                where = ".".join(str(part) for part in error["loc"])
                raise invalid(f"tasks.{name}.finetune.{where}" if where else f"tasks.{name}.finetune",
                              error["msg"]) from None
        for name in (*self.study.tasks, *self.sensitivity.tasks):
            if name in self.tasks and self.tasks[name].kind == "multitask":
                raise invalid(f"tasks.{name}.kind", "a multitask task trains on its components' splits: list it "
                                                    "under study.multitask_tasks, not study.tasks or sensitivity.tasks")
            if name in self.tasks and self.tasks[name].kind == "retrieval":
                raise invalid(f"tasks.{name}.kind", "a retrieval task trains nothing: list it under "
                                                    "study.retrieval_tasks, not study.tasks or sensitivity.tasks")
        for section in ("study", "sensitivity"):
            for key, catalogue in (("tasks", self.tasks), ("backbones", self.backbones)):
                for name in getattr(getattr(self, section), key):
                    if name not in catalogue:
                        raise invalid(f"{section}.{key}", f"{name!r} is not defined under '{key}'; allowed values: "
                                                          f"{', '.join(sorted(catalogue))}")
        for name in self.compare.learning_floors:  # a task, <task>:<mode>, or a multitask <task>/<component>
            task, _, component = name.partition("/")
            if component and (task not in self.tasks or component not in self.tasks[task].components):
                raise invalid(f"compare.learning_floors.{name}", f"{component!r} is not a component of a multitask "
                                                                 f"task {task!r} under 'tasks'")
            task, _, mode = task.partition(":")
            if task not in self.tasks or mode not in ("", *Mode.__args__):
                raise invalid(f"compare.learning_floors.{name}", f"{name!r} is not a task under 'tasks' (or "
                                                                 f"<task>:{'|'.join(Mode.__args__)}); tasks: "
                                                                 f"{', '.join(sorted(self.tasks))}")
        if self.finetune.hyperparameters == "tuned":
            for name in self.study.backbones:
                if self.backbones[name].tuned is None:
                    raise invalid(f"backbones.{name}.tuned", "missing, but finetune.hyperparameters is 'tuned'; "
                                  "set it from reports/sensitivity/<task>/best_params.json "
                                  "(`transferbench sensitivity-report`)")
        for name, task in self.tasks.items():
            if task.split is None:
                continue
            rule = task.split.geographic
            for key in ("train_regions", "val_regions"):
                unknown = [r for r in getattr(rule, key) if r not in self.data.regions]
                if task.split.rule == "geographic" and unknown:
                    raise invalid(f"tasks.{name}.split.geographic.{key}", f"{unknown} not defined under "
                                  f"'data.regions'; allowed values: {', '.join(self.data.regions)}")
        return self

    def task(self, name: str) -> TaskSettings:
        if name not in self.tasks:
            raise ConfigError(f"unknown task {name!r}; defined tasks: {', '.join(sorted(self.tasks))}")
        return self.tasks[name]

    def backbone(self, name: str) -> BackboneSettings:
        if name not in self.backbones:
            raise ConfigError(f"unknown backbone {name!r}; defined backbones: {', '.join(sorted(self.backbones))}")
        return self.backbones[name]

    def seeds_of(self, task: str) -> tuple[int, ...]:
        """The task's seeds (``tasks.<task>.seeds``, else ``study.seeds``); a retrieval task has one run, seed 0."""
        settings = self.task(task)
        if settings.kind == "retrieval":
            return (0,)
        return settings.seeds if settings.seeds is not None else self.study.seeds

    def modes_of(self, task: str) -> tuple[str, ...]:
        """The task's training modes (``tasks.<task>.modes``, else ``study.modes``); ``frozen`` for retrieval."""
        settings = self.task(task)
        if settings.kind == "retrieval":
            return ("frozen",)
        return settings.modes if settings.modes is not None else self.study.modes

    def presets(self) -> dict[str, tuple[str, ...]]:
        """Preset name -> backbone names, in catalogue order (what tests and benchmarks iterate)."""
        out: dict[str, list[str]] = {}
        for name, entry in self.backbones.items():
            out.setdefault(entry.preset, []).append(name)
        return {k: tuple(v) for k, v in out.items()}

    def backbones_of(self, task: str) -> tuple[str, ...]:
        """The study backbones ``task`` runs on: ``study.backbones``, narrowed by the task's own ``backbones``."""
        own = self.task(task).backbones
        return tuple(b for b in self.study.backbones if own is None or b in own)

    def runs_on(self, task: str, backbone: str) -> bool:
        """False when the task lists its own backbones and not this one (any backbone runs on a task that lists none,
        in the study or not)."""
        own = self.task(task).backbones
        return own is None or backbone in own

    @staticmethod
    def _protocol(finetune: FinetuneSettings, task: TaskSettings) -> FinetuneSettings:
        if not task.finetune:
            return finetune
        return FinetuneSettings.model_validate({**finetune.model_dump(exclude_unset=True), **task.finetune})

    def finetune_for(self, backbone: str, task: str | None = None) -> FinetuneSettings:
        """The protocol ``backbone`` trains with on ``task``: finetune's, with the task's own values
        (``tasks.<task>.finetune``) over it, and the backbone's tuned lr and warm-up when
        finetune.hyperparameters is 'tuned'."""
        protocol = self.finetune if task is None else self._protocol(self.finetune, self.task(task))
        if protocol.hyperparameters == "paper":
            return protocol
        tuned = self.backbone(backbone).tuned
        if tuned is None:
            raise ConfigError(f"params key 'backbones.{backbone}.tuned': missing, but finetune.hyperparameters is "
                              "'tuned'; set it from reports/sensitivity/<task>/best_params.json "
                              "(`transferbench sensitivity-report`)")
        return protocol.model_copy(update=tuned.model_dump())


# --------------------------------------------------------------------------- loading
_TYPE_TEXT = {"int_type": "expected an integer", "int_from_float": "expected an integer",
              "float_type": "expected a number", "bool_type": "expected true or false",
              "string_type": "expected a string", "dict_type": "expected a mapping", "model_type": "expected a mapping",
              "tuple_type": "expected a list", "list_type": "expected a list"}
_BOUND_TEXT = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<"}
_NUMBER = re.compile(r"[-+]?(\.[0-9]+|[0-9]+(\.[0-9]*)?)([eE][-+]?[0-9]+)?")  # as YAML 1.2 writes a number


def _base(annotation: Any) -> Any:
    """``annotation`` without Optional and Annotated wrappers (the first non-None member of a union)."""
    while True:
        origin = typing.get_origin(annotation)
        if origin is Annotated:
            annotation = typing.get_args(annotation)[0]
        elif origin in (typing.Union, types.UnionType):
            annotation = next(a for a in typing.get_args(annotation) if a is not type(None))
        else:
            return annotation


def _field_at(loc: tuple[Any, ...]) -> tuple[type[BaseModel] | None, Any]:
    """Follow ``loc`` from ``Settings``: (the model owning its last key, that key's field or item annotation).

    A key the model does not have gives (that model, None): where an unknown key was found.
    """
    current: Any = Settings
    owner, field = None, None
    for part in loc:
        base = _base(current)
        if isinstance(base, type) and issubclass(base, BaseModel) and isinstance(part, str):
            if part not in base.model_fields:
                return base, None
            owner, field = base, base.model_fields[part]
            current = field.annotation
        elif typing.get_origin(base) in (dict, tuple):  # a mapping key or a list index: its item type
            field = current = typing.get_args(base)[-1 if typing.get_origin(base) is dict else 0]
        else:
            return owner, field
    return owner, field


def _bounds(annotation: Any) -> dict[str, Any]:
    """The ge/gt/le/lt bounds declared on a field (or a tuple's items)."""
    found: dict[str, Any] = {}
    stack = [annotation]
    while stack:
        item = stack.pop()
        if item is None:
            continue
        for meta in getattr(item, "metadata", ()) or ():
            for name in _BOUND_TEXT:
                if isinstance(meta, getattr(annotated_types, name.capitalize())):
                    found[name] = getattr(meta, name)
            stack.append(meta)
        if hasattr(item, "annotation"):
            stack.append(item.annotation)
        stack += [a for a in typing.get_args(item) if not isinstance(a, (str, int, float))]
    return found


def _key(loc: tuple[Any, ...]) -> str:
    key = ""
    for part in loc:
        key += f"[{part}]" if isinstance(part, int) else (f".{part}" if key else str(part))
    return key


def _message(error: dict[str, Any]) -> str:
    loc, kind, value = tuple(error["loc"]), error["type"], error.get("input")
    if kind == "transferbench":
        relative = error["ctx"].get("key")
        return f"params key '{_key(loc + tuple(relative.split('.')) if relative else loc)}': {error['ctx']['message']}"
    where = f"params key '{_key(loc)}'" if loc else "params file"
    if kind == "extra_forbidden":
        owner, _ = _field_at(loc)
        allowed = sorted(owner.model_fields) if owner is not None else []
        close = difflib.get_close_matches(str(loc[-1]), allowed, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        return f"{where}: unknown key{hint}; allowed keys: {', '.join(allowed)}"
    if kind == "missing":
        return f"{where}: missing required key"
    if kind == "literal_error":
        return f"{where}: {value!r} is not allowed; allowed values: {error['ctx']['expected'].replace(' or ', ', ')}"
    if kind in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
        _, field = _field_at(loc)
        bounds = _bounds(field) or {k: v for k, v in error["ctx"].items() if k in _BOUND_TEXT}
        allowed = " and ".join(f"{_BOUND_TEXT[n]} {bounds[n]}" for n in _BOUND_TEXT if n in bounds)
        return f"{where}: {value!r} is out of range; allowed: {allowed}"
    if kind in _TYPE_TEXT:
        expected = _TYPE_TEXT[kind]
        if kind in ("int_type", "int_from_float", "float_type"):
            bounds = _bounds(_field_at(loc)[1])
            expected += "".join(f" {'and ' if i else ''}{_BOUND_TEXT[n]} {bounds[n]}"
                                for i, n in enumerate(n for n in _BOUND_TEXT if n in bounds))
        return f"{where}: {expected}, got {_shown(value)}{_type_note(value)}"
    return f"{where}: {error['msg']} (got {_shown(value)})"


def _shown(value: Any) -> str:
    """``value`` as it reads in YAML (true, null), not as Python prints it (True, None)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return "null" if value is None else repr(value)


def _type_note(value: Any) -> str:
    """What YAML made of a wrongly typed value: a bool looks like a number to many readers, a quoted number like
    a number to all."""
    if isinstance(value, bool):
        return " (a bool)"
    if isinstance(value, str):
        return " (a string: a number is written without quotes)" if _NUMBER.fullmatch(value) else " (a string)"
    if isinstance(value, (list, tuple)):
        return " (a list)"
    return " (a mapping)" if isinstance(value, dict) else ""


def build(cls: type[Section], raw: Any, *, datasets: Collection[str] | None = None) -> Any:
    """Validate ``raw`` (a params mapping, or one section of it) into ``cls``; ``ConfigError`` names the key.

    ``datasets``: the registered dataset names (``transferbench.data.registry.list_datasets()``); given, every
    task's dataset must be one of them. The caller passes them because the data layer sits above this module.
    """
    try:
        return cls.model_validate({} if raw is None else raw, context={"datasets": datasets})
    except ValidationError as exc:
        raise ConfigError("\n".join(_message(e) for e in exc.errors())) from None


class ParamsLoader(yaml.SafeLoader):
    """PyYAML's safe loader, but a plain ``1e-4`` is a number, as in YAML 1.2. PyYAML follows YAML 1.1, where a
    float needs a dot and a signed exponent (``1.0e-4``), and reads ``1e-4`` as a string; but DVC (ruamel.yaml)
    reads params.yaml as YAML 1.2, and ``dvc exp run -S finetune.warmup_lr=1e-6`` writes ``1e-06`` into it. A
    quoted "1e-4" stays a string, which a number key refuses."""


ParamsLoader.add_implicit_resolver("tag:yaml.org,2002:float",
                                   re.compile(r"^[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)[eE][-+]?[0-9]+$"),
                                   list("-+.0123456789"))


def parse_params(text: str) -> Any:
    """The raw mapping of a params file's text (``ParamsLoader``); ``yaml.YAMLError`` when it is not YAML."""
    return yaml.load(text, Loader=ParamsLoader)


def load_settings(path: str | Path = DEFAULT_PARAMS, *, datasets: Collection[str] | None = None) -> Settings:
    """Load and validate ``params.yaml``; raise ``ConfigError`` naming the key at fault.

    ``datasets``: the registered dataset names, to check every task's dataset against (see ``build``).
    """
    path = Path(path)
    try:
        raw = parse_params(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"params file not found: {path}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"params file {path} is not valid YAML: {exc}") from None
    return build(Settings, raw, datasets=datasets)
