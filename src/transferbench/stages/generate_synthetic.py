"""Stage ``generate_synthetic@<dataset>``: a generated dataset of the smoke study (``data.<dataset>``).

- ``synthetic``: shapes to classify (``data.synthetic``);
- ``synthetic_age``: the age drawn into each image, by "individual" (``data.synthetic_age``);
- ``synthetic_retrieval``: "landmarks" from several viewpoints, in Oxford5k's layout
  (``data.synthetic_retrieval``).
"""

from __future__ import annotations

from transferbench.config import Settings
from transferbench.data import synthetic, synthetic_age, synthetic_retrieval
from transferbench.data.registry import dataset_root

GENERATED = ("synthetic", "synthetic_age", "synthetic_retrieval")


def run(settings: Settings, dataset: str = "synthetic") -> str:
    dest = dataset_root(settings.data, dataset)
    if dataset == "synthetic":
        table = synthetic.generate(settings.data.synthetic, dest)
    elif dataset == "synthetic_age":
        table = synthetic_age.generate(dest, **settings.data.synthetic_age.model_dump())
    elif dataset == "synthetic_retrieval":
        table = synthetic_retrieval.generate(dest, **settings.data.synthetic_retrieval.model_dump())
    else:
        raise ValueError(f"unknown generated dataset {dataset!r}; expected one of {GENERATED}")
    return f"{dataset}: {len(table)} images in {dest}"
