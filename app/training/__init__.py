"""Sorted Fine-Tuning (SoFT): the trainer, its data pipeline and the default-checkpoint recipe."""
