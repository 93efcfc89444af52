"""Optuna sensitivity studies of the fixed lr / warm-up choices (PROTOCOL.md, "Sensitivity")."""
