"""Data: dataset adapters (registry), splits, validation and quarantine (issue #3; PROTOCOL.md,
"Tasks and splits"). Entry points: ``registry.get_dataset``, ``splits.split_task``,
``validation.validate_task``; the CLI's ``fetch``, ``generate``, ``split`` and ``validate`` call them.
"""
