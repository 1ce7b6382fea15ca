"""Model definitions and weight loading."""

from batchllm.models.spec import ModelLoadError, ModelSpec, read_model_spec

__all__ = ["ModelLoadError", "ModelSpec", "read_model_spec"]
