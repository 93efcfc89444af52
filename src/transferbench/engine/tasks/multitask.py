"""Multi-task learning: one backbone, one head per component task, one optimiser (PROTOCOL.md, "Multi-task").

A multitask task names its components (``tasks.<task>.components``: trained single tasks of the study);
each component keeps its own kind: its targets, head, loss and metrics. The engine reads the
components' split manifests, combined (``engine.inputs``):

- **joint**: components on the same dataset and split (NYU segmentation + depth) share every image,
  which carries every component's target;
- **mixed**: components on different datasets (Indoor67 + Caltech101, segmentation + WikiArt) are
  shuffled into one training set; each image carries the target of its own dataset (its ``domain``),
  and the others' are "ignore" fills.

Model: the backbone's pyramid if any component is dense (a classification head then reads the
global-average-pooled last level, ``PooledLast``), else its pooled features; one head per component.
Two mixed classification datasets also get the paper's pre-classification head: one logit (sigmoid)
that tells which dataset an image comes from, trained with binary cross-entropy; at evaluation it routes
each image to one head, and a misrouted image counts as a wrong answer.

Loss: the sum over components of ``loss_weights`` x the component's loss on its domain's images (plus
the router's). Selection: the val loss (lowest). Metrics: every component's, named ``<component>.<metric>``
and computed on its domain's images, plus ``routing_accuracy`` when routed. The training statistic is the
first component's (a batch-size-weighted mean over batches).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.nn import functional as F

from transferbench.config import ConfigError, FinetuneSettings, TaskSettings
from transferbench.engine.tasks.base import MetricSpec, TaskKind, kind_for_task, register_task_kind
from transferbench.engine.tasks.dense import IGNORE, dense_train_transforms

ROUTER = "router"
DOMAIN = "domain"


def _fill(dtype: torch.dtype) -> int | float:
    """The "no target" value of a target dtype: ignored masks (uint8), invalid depth (float), no label (int64)."""
    if dtype == torch.uint8:
        return IGNORE
    return 0.0 if dtype.is_floating_point else -1


class MultiHead(nn.Module):
    def __init__(self, heads: Mapping[str, nn.Module], router: nn.Module | None) -> None:
        super().__init__()
        self.heads = nn.ModuleDict(heads)
        self.router = router

    def forward(self, features: Any) -> dict[str, torch.Tensor]:
        out = {name: head(features) for name, head in self.heads.items()}
        if self.router is not None:
            out[ROUTER] = self.router(features).squeeze(1)
        return out


class MultiTaskLoss(nn.Module):
    def __init__(self, names: Sequence[str], losses: Sequence[nn.Module], domains: Sequence[int],
                 weights: Sequence[float], routed: bool) -> None:
        super().__init__()
        self.names, self.domains, self.weights, self.routed = tuple(names), tuple(domains), tuple(weights), routed
        self.losses = nn.ModuleList(losses)

    def forward(self, outputs: dict[str, torch.Tensor], targets: dict[str, torch.Tensor]) -> torch.Tensor:
        domain = targets[DOMAIN]
        total = outputs[self.names[0]].new_zeros(()).float()
        for name, loss, d, weight in zip(self.names, self.losses, self.domains, self.weights, strict=True):
            rows = domain == d
            if rows.any():
                total = total + weight * loss(outputs[name][rows], targets[name][rows])
            else:  # no image of this dataset in the batch: its head takes no part (a zero that keeps the graph)
                total = total + outputs[name].sum() * 0.0
        if self.routed:
            total = total + F.binary_cross_entropy_with_logits(outputs[ROUTER].float(),
                                                               (domain == self.domains[1]).float())
        return total


@register_task_kind("multitask")
@dataclass(frozen=True)
class MultiTask(TaskKind):
    names: tuple[str, ...]
    kinds: tuple[TaskKind, ...]
    domains: tuple[int, ...]  # each component's domain (joint components share one)
    weights: tuple[float, ...]
    routed: bool
    selections: tuple[str, ...] = ()  # each component task's own metric (tasks.<component>.metric): its rank

    metrics = (MetricSpec("loss", higher_is_better=False),)  # per instance: every component's (__post_init__)
    selection = MetricSpec("loss", higher_is_better=False)
    train_statistic = "loss"
    target_column = None
    unused_parameters = True

    def __post_init__(self) -> None:
        # instance values over the class's: they depend on the components
        specs = [MetricSpec(f"{n}.{m.name}", m.higher_is_better) for n, k in zip(self.names, self.kinds) for m in
                 k.metrics]
        if self.routed:
            specs.append(MetricSpec("routing_accuracy"))
        object.__setattr__(self, "metrics", tuple(specs))
        object.__setattr__(self, "features", "pyramid" if any(k.features == "pyramid" for k in self.kinds)
                           else "pooled")
        object.__setattr__(self, "dense_targets", any(k.dense_targets for k in self.kinds))
        object.__setattr__(self, "train_statistic", f"{self.names[0]}.{self.kinds[0].train_statistic}")

    @classmethod
    def metric(cls, name: str, *, key: str = "metric") -> MetricSpec:
        if name.removeprefix("val_").removeprefix("test_") != "loss":
            raise ConfigError(f"params key '{key}': a multitask task selects its checkpoint by its summed val loss; "
                              f"set it to 'loss' (got {name!r}); each component is ranked by its own metric")
        return cls.selection

    @classmethod
    def for_task(cls, task: TaskSettings, summary: Mapping[str, Any]) -> MultiTask:
        """From the combined summary ``engine.inputs`` writes: each component's settings, split summary and domain."""
        components = summary.get("components")
        if not components:
            raise ConfigError("a multitask task's summary lists no components (prepare it with engine.inputs)")
        kinds = tuple(kind_for_task(TaskSettings.model_validate(c["settings"]), c["summary"]) for c in components)
        routed = bool(summary.get("routed"))
        if routed and len(kinds) != 2:
            raise ConfigError(f"the pre-classification head routes between two datasets, got {len(kinds)}")
        return cls(tuple(c["name"] for c in components), kinds, tuple(int(c["domain"]) for c in components),
                   tuple(task.loss_weights or (1.0,) * len(components)), routed,
                   tuple(c["settings"]["metric"] for c in components))

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {"components": ",".join(self.names), "component_kinds": ",".join(k.name for k in
                                                                                              self.kinds),
                               "loss_weights": ",".join(map(str, self.weights)), "routed": self.routed,
                               "mixed": len(set(self.domains)) > 1}
        for name, kind in zip(self.names, self.kinds, strict=True):
            out.update({f"{name}.{k}": v for k, v in kind.describe().items()})
        return out

    def targets(self, frame: pd.DataFrame, manifest: Path, *, side: int | None = None) -> dict[str, torch.Tensor]:
        domain = torch.tensor(frame[DOMAIN].to_numpy(dtype=np.int64))
        out = {DOMAIN: domain}
        for name, kind, d in zip(self.names, self.kinds, self.domains, strict=True):
            rows = (domain == d).numpy()
            own = kind.targets(frame[rows].reset_index(drop=True), manifest, side=side)
            full = torch.full((len(frame), *own.shape[1:]), _fill(own.dtype), dtype=own.dtype)
            full[torch.from_numpy(rows)] = own
            out[name] = full
        return out

    def head(self, in_features: Any, protocol: FinetuneSettings) -> nn.Module:
        from transferbench.models.dense import PooledLast

        pooled = in_features[-1] if self.features == "pyramid" else in_features

        def own(kind: TaskKind) -> nn.Module:
            if kind.features == self.features:
                return kind.head(in_features, protocol)
            return PooledLast(kind.head(pooled, protocol))  # a pooled head on a dense backbone's last level

        router = None
        if self.routed:
            router = nn.Sequential(nn.Dropout(protocol.head_dropout), nn.Linear(pooled, 1))
            if self.features == "pyramid":
                router = PooledLast(router)
        return MultiHead({n: own(k) for n, k in zip(self.names, self.kinds, strict=True)}, router)

    def train_transforms(self, img_size: int, protocol: FinetuneSettings) -> Any:
        """With a dense component, the dense augmentation (random crop and flip, maps moved with their image);
        else the engine's classification augmentation."""
        return dense_train_transforms(img_size, protocol) if self.dense_targets else None

    def batch_augmentation(self, protocol: FinetuneSettings) -> tuple[float, bool] | None:
        return (0.0, protocol.hflip) if self.dense_targets else (protocol.rotation_degrees, protocol.hflip)

    def loss(self, protocol: FinetuneSettings) -> nn.Module:
        return MultiTaskLoss(self.names, [k.loss(protocol) for k in self.kinds], self.domains, self.weights,
                             self.routed)

    def statistic(self, outputs: dict[str, torch.Tensor], targets: dict[str, torch.Tensor]) -> torch.Tensor:
        name, kind = self.names[0], self.kinds[0]
        rows = targets[DOMAIN] == self.domains[0]
        n = rows.sum()
        if not n:
            return torch.zeros((), device=rows.device)
        return kind.statistic(outputs[name][rows], targets[name][rows]) * len(rows) / n

    def reduce(self, outputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = {n: k.reduce(outputs[n]) for n, k in zip(self.names, self.kinds, strict=True)}
        if self.routed:
            out[ROUTER] = outputs[ROUTER]
        return out

    def answers(self, outputs: dict[str, torch.Tensor]) -> list[dict[str, Any]]:
        """Per image: each component's answer under its name, and with a pre-classification head, the dataset it
        routes the image to (``router``: the component and its probability)."""
        per_component = {n: k.answers(outputs[n]) for n, k in zip(self.names, self.kinds, strict=True)}
        rows = [{n: answers[i] for n, answers in per_component.items()} for i in range(len(outputs[self.names[0]]))]
        if self.routed:  # the router's logit says "the second domain's dataset"
            for row, p in zip(rows, torch.sigmoid(outputs[ROUTER].double()).tolist(), strict=True):
                row[ROUTER] = {"component": self.names[int(p > 0.5)], "probability": max(p, 1.0 - p)}
        return rows

    def _routed(self, outputs: np.ndarray, targets: np.ndarray, misrouted: np.ndarray) -> np.ndarray:
        """Classification logits with every misrouted image's answer made wrong (a class other than its label)."""
        out = outputs.copy()
        for i in np.flatnonzero(misrouted):
            wrong = (int(targets[i]) + 1) % out.shape[1]
            out[i] = -np.inf
            out[i, wrong] = 0.0
        return out

    def evaluate(self, outputs: dict[str, np.ndarray], targets: dict[str, np.ndarray]) -> dict[str, float | None]:
        domain = np.asarray(targets[DOMAIN])
        scores: dict[str, float | None] = {}
        routed_right = None
        if self.routed:
            routed_right = (np.asarray(outputs[ROUTER]) > 0) == (domain == self.domains[1])
            scores["routing_accuracy"] = float(routed_right.mean()) if len(domain) else None
        for name, kind, d in zip(self.names, self.kinds, self.domains, strict=True):
            rows = domain == d
            o, t = np.asarray(outputs[name])[rows], np.asarray(targets[name])[rows]
            if routed_right is not None:
                o = self._routed(o, t, ~routed_right[rows])
            if not rows.any():
                values = {m.name: None for m in kind.metrics}
            else:
                values = kind.evaluate(o, t)
            scores.update({f"{name}.{k}": v for k, v in values.items()})
        return scores

    def figures(self, outputs: dict[str, np.ndarray], targets: dict[str, np.ndarray], directory: Path, *,
                title: str, images: np.ndarray | None = None) -> list[Path]:
        domain = np.asarray(targets[DOMAIN])
        paths = []
        for name, kind, d in zip(self.names, self.kinds, self.domains, strict=True):
            rows = domain == d
            if not rows.any():
                continue
            # the images only where they are this component's first images (joint, or its rows come first)
            own = images if images is not None and rows[:len(images)].all() else None
            for path in kind.figures(np.asarray(outputs[name])[rows], np.asarray(targets[name])[rows], directory,
                                     title=f"{title} [{name}]", images=own):
                paths.append(path.rename(path.with_name(f"{name}_{path.name}")))
        return paths

    def result_fields(self, final: Mapping[str, Any]) -> dict[str, Any]:
        """``components``: the run's val and test score on each component, by the component task's own metric."""
        out = []
        for name, kind, metric in zip(self.names, self.kinds, self.selections, strict=True):
            spec = kind.metric(metric, key=f"tasks.{name}.metric")
            out.append({"task": name, "kind": kind.name, "metric": metric, "higher_is_better": spec.higher_is_better,
                        "val_score": final.get(f"val_{name}.{metric}"), "test_score": final.get(f"test_{name}.{metric}")})
        return {"components": out}

    def prediction_table(self, filenames: Sequence[str], outputs: dict[str, np.ndarray],
                         targets: dict[str, np.ndarray]) -> pd.DataFrame:
        domain = np.asarray(targets[DOMAIN])
        names = np.asarray(list(filenames), dtype=object)
        tables = []
        for name, kind, d in zip(self.names, self.kinds, self.domains, strict=True):
            rows = domain == d
            if rows.any():
                table = kind.prediction_table(list(names[rows]), np.asarray(outputs[name])[rows],
                                              np.asarray(targets[name])[rows])
                tables.append(table.assign(task=name))
        return pd.concat(tables, ignore_index=True) if tables else pd.DataFrame({"filename": []})
