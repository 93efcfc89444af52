"""Data: dataset adapters (registry), splits, validation and quarantine (PROTOCOL.md, "Tasks and
splits"). Entry points: ``registry.get_dataset``, ``splits.split_task``, ``validation.validate_task``;
the stages ``fetch``, ``generate_synthetic``, ``split`` and ``validate`` call them.

Importing the package registers every adapter (as timm's ``models/__init__`` does for its models).
"""

from transferbench.data import (  # noqa: F401
    caltech101,
    covid_chestxray,
    cub200,
    fgnet,
    flowers102,
    indoor67,
    nyu_depth_v2,
    oxford5k,
    synthetic,
    synthetic_age,
    synthetic_dense,
    synthetic_retrieval,
    wikiart,
)
