"""The build: normal images -> features -> FINCH prototypes -> network -> ONNX, into a bundle."""

from .pipeline import BuildConfig, BuildResult, build, parse_batch_profile

__all__ = ["BuildConfig", "BuildResult", "build", "parse_batch_profile"]
