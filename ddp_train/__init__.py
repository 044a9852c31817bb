"""ddp-train: train timm image classifiers on WebDataset shards with DDP or DeepSpeed."""

__version__ = "0.1.0"
