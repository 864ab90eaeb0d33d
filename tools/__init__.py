"""Command-line tools beside the scripts: `python -m tools.audit` (check a dataset), `python -m
tools.average_checkpoints` (average the weights of several checkpoints)."""
