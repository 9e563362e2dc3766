"""Tests of the model package: data, ImageClassifier, checkpoints, the train/evaluate commands."""
