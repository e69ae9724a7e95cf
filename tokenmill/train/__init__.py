"""Training for Parcae looped models and fixed-depth transformers: data (data.py), the loop (trainer.py), the
`tokenmill train` CLI (cli.py) and the Parcae studies (studies/). See docs/PARCAE.md."""

from tokenmill.train.trainer import TrainConfig, TrainResult, train

__all__ = ["TrainConfig", "TrainResult", "train"]
