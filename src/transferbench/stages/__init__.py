"""One module per DVC stage, named like it (``dvc.yaml`` stage ``finetune`` -> ``stages/finetune.py``).

Each module reads its own sections of the settings, builds the pieces from ``engine``,
``evaluation``, ``tuning`` and ``data``, calls them and writes the stage's outputs; the command
line (``transferbench.cli``) parses arguments and calls the stage's ``run``. ``fetch`` is the step
``make repro`` runs before ``dvc repro`` (``data.dvc`` versions its output).
"""
