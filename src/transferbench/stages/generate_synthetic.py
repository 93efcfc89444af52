"""Stage ``generate_synthetic@<dataset>``: a generated dataset of the smoke study (``data.<dataset>``).

- ``synthetic``: shapes to classify (``data.synthetic``);
- ``synthetic_b``: a second classification domain, other shapes on a light background, for the mixed
  multi-task case (``data.synthetic_b``, same generator);
- ``synthetic_age``: the age drawn into each image, by "individual" (``data.synthetic_age``);
- ``synthetic_retrieval``: "landmarks" from several viewpoints, in Oxford5k's layout
  (``data.synthetic_retrieval``);
- ``synthetic_dense``: shapes at depths with masks and depth maps, in NYU Depth V2's layout
  (``data.synthetic_dense``).
"""

from __future__ import annotations

from transferbench.config import Settings
from transferbench.data import synthetic, synthetic_age, synthetic_dense, synthetic_retrieval
from transferbench.data.registry import dataset_root

GENERATED = ("synthetic", "synthetic_b", "synthetic_age", "synthetic_retrieval", "synthetic_dense")


def run(settings: Settings, dataset: str = "synthetic") -> str:
    dest = dataset_root(settings.data, dataset)
    if dataset == "synthetic":
        table = synthetic.generate(settings.data.synthetic, dest)
    elif dataset == "synthetic_b":
        table = synthetic.generate(settings.data.synthetic_b, dest)
    elif dataset == "synthetic_age":
        table = synthetic_age.generate(dest, **settings.data.synthetic_age.model_dump())
    elif dataset == "synthetic_retrieval":
        table = synthetic_retrieval.generate(dest, **settings.data.synthetic_retrieval.model_dump())
    elif dataset == "synthetic_dense":
        table = synthetic_dense.generate(dest, **settings.data.synthetic_dense.model_dump())
    else:
        raise ValueError(f"unknown generated dataset {dataset!r}; expected one of {GENERATED}")
    return f"{dataset}: {len(table)} images in {dest}"
