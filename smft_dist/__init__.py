"""smft-dist: distributed continual learning by sparse memory finetuning."""

__version__ = "0.1.0"
