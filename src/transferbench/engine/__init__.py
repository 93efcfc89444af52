"""The fine-tuning engine: everything a stage calls to train and track one run.

- ``tasks``: the task-kind registry (target, head, loss, metrics, optimiser, schedule);
- ``inputs``: manifests -> task kind -> probed backbone -> image caches (one place);
- ``data``: the decoded image cache, augmentation and loaders;
- ``loop``: the protocol's training loop (no Ray, no MLflow);
- ``ray_driver`` / ``ray_worker`` / ``spec``: Ray Train (local mode or worker actors), checkpoints
  (``checkpoints``), resume;
- ``tracking``: MLflow runs; ``curves``: learning curves; ``cluster``: Ray clusters for a command;
- ``finetune``: one (task, backbone, seed) end to end.
"""
