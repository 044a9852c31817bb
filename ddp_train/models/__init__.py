"""Models: a timm classifier by name, or the FiLM fusion model (image + sensor + env) around one."""
from .build import build_model

__all__ = ["build_model"]
