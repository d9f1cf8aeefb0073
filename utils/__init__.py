"""Run infrastructure: distributed helpers, checkpoints, logging, metrics, schedules."""
