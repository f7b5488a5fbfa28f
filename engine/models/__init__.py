"""Model loading, architectures, descriptions and layer choice."""

from .config import build_spec, read_config, write_config
from .loading import FORMATS, LoadedModel, ModelLoadError, detect_format, load_model

__all__ = ["FORMATS", "LoadedModel", "ModelLoadError", "build_spec", "detect_format", "load_model",
           "read_config", "write_config"]
