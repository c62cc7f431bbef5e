"""slimlab's Optuna sweeper for Hydra: multi-objective search on current Optuna, resumable from its storage."""
