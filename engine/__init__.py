"""The training engine: the loop (train_one_epoch, evaluate), optimiser, schedule, checkpoints, distributed
helpers, precision and the wall-clock budget. Tricks are built by the scripts and handed to the loop."""
