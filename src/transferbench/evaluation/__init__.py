"""Evaluation: what the study's fine-tuning results say (PROTOCOL.md, "What the results look like").

- ``results``: strict readers of the per-(task, backbone, seed) metrics JSON written by training.
- ``metrics``: classification metrics and a test-manifest evaluator (load-back checks).
- ``ranking``: per-task ranks, backbone and family average ranks (Zhou et al. 2021, Tables 2-3).
- ``multitask``: performance, relative change over single-task training and rank (Tables 9-13).
- ``significance``: Friedman test and Nemenyi critical difference across tasks.
- ``reports``: the rank table as Markdown, CSV, JSON and a rank heat-map.
- ``drift``: the drift gate comparing a rank table with a committed baseline.
- ``registry``: best checkpoints into the MLflow Model Registry, with aliases.
"""
