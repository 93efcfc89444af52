"""Stage ``generate_synthetic``: the generated dataset of the smoke study (``data.synthetic``)."""

from __future__ import annotations

from transferbench.config import Settings
from transferbench.data.registry import dataset_root
from transferbench.data.synthetic import generate


def run(settings: Settings) -> str:
    dest = dataset_root(settings.data, "synthetic")
    table = generate(settings.data.synthetic, dest)
    return f"synthetic: {len(table)} images in {dest}"
