"""protoad-export: normal images -> ProtoAD prototypes -> ONNX -> TensorRT engines for a production line."""

__version__ = "0.1.0"

__all__ = ["__version__", "build", "BuildConfig", "Preprocessing"]


def __getattr__(name: str):
    # Keep ``import protoad_export`` light: torch and friends load only when the API is used.
    if name in ("build", "BuildConfig"):
        from .build import pipeline as _build

        return getattr(_build, name)
    if name == "Preprocessing":
        from .data.images import Preprocessing

        return Preprocessing
    raise AttributeError(name)
