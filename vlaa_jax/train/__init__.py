"""Training: optimizer (optim.py), the sharded train step (step.py), checkpoints, metrics, trainers."""
