"""Streaming WebDataset loader with exact, equal epochs on every rank and mid-epoch resume."""
from .loader import ShardLoader, build_loader, build_transform

__all__ = ["ShardLoader", "build_loader", "build_transform"]
