"""transferbench: whose visual representations transfer better, ConvNets' or Transformers'?

A reproducible pipeline around Zhou et al. (2021): DVC for data and lineage, Ray Train
for fine-tuning, MLflow for tracking and the model registry, Optuna for sensitivity,
great-expectations for data validation.
"""

__version__ = "0.1.0"
