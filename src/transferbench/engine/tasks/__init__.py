"""Task kinds: what a target is, the head, the loss, the metrics (a registry, as timm's models).

A task kind is one module with one ``@register_task_kind`` class (``TaskKind``). It supplies:

- how a manifest row becomes a target (``targets``) and the task's label space (``for_task``);
- its head on the backbone's pooled features (``head``) and its loss (``loss``);
- its metrics, each with a direction (``metrics``), the one that picks the best epoch and drives
  the plateau schedule and early stopping (``selection``), and a per-step training statistic;
- its optimiser and schedule (``optimizer``, ``scheduler``: the paper's Adam and plateau halving
  by default);
- what a finished run logs beside its metrics (``figures``, ``prediction_table``), which is also
  how the registry re-scores a loaded model (``evaluate``).

The loop, the Ray driver and worker, tracking, the registry, the rank tables and the drift gate go
through this interface and never name a kind. ``tasks.<task>.kind`` in params.yaml picks one.
"""

from transferbench.engine.tasks.base import (
    MetricSpec,
    TaskKind,
    get_task_kind,
    kind_for_task,
    list_task_kinds,
    register_task_kind,
    task_metric,
)
from transferbench.engine.tasks import age, classification, dense, multitask, retrieval  # noqa: E402,F401  (register)

__all__ = ["MetricSpec", "TaskKind", "get_task_kind", "kind_for_task", "list_task_kinds", "register_task_kind",
           "task_metric"]
