"""Runs one job on this machine: specs, datasets, the LoRA trainer, the supervised runner, devices."""
