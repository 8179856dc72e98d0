"""ovfast: a fast, reference-exact inference engine for LLaVA-OneVision.

    import ovfast
    engine = ovfast.load("llava-hf/llava-onevision-qwen2-0.5b-ov-hf")   # or a local directory
    print(engine.generate("photo.jpg", "What is shown in this image?"))
"""
from .api import DEFAULT_MODEL, generate, get_engine
from .errors import (
    ConfigError,
    ContextLengthError,
    EmptyContinuationError,
    EmptyVideoError,
    EngineBusyError,
    EngineOverloadedError,
    GenerationParamsError,
    GrammarError,
    ImageReadError,
    ImageTooLargeError,
    InputError,
    MediaAccessError,
    ModelLoadError,
    OvfastError,
    PlaceholderError,
    PromptError,
    StructuredOutputsUnavailableError,
    TooManyImagesError,
    UnsupportedInputError,
    VideoReadError,
)
from .inputs.media import Video, set_max_image_pixels
from .inputs.preprocess import preprocess
from .runtime.engine import Engine, EngineConfig, RequestHandle, load
from .runtime.generation import Completion, Timings, TokenLogprob

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_MODEL", "Completion", "ConfigError", "ContextLengthError", "EmptyContinuationError", "EmptyVideoError", "Engine",
    "EngineBusyError", "EngineConfig", "EngineOverloadedError", "GenerationParamsError", "GrammarError", "ImageReadError", "ImageTooLargeError", "InputError", "MediaAccessError",
    "ModelLoadError", "OvfastError", "PlaceholderError", "PromptError", "RequestHandle", "StructuredOutputsUnavailableError", "Timings", "TokenLogprob", "TooManyImagesError",
    "UnsupportedInputError", "Video", "VideoReadError", "build_checkpoint", "generate", "get_engine", "load",
    "preprocess", "set_max_image_pixels",
]


def __getattr__(name: str):
    # build_checkpoint (random-weight test checkpoints) comes from ovfast.testing, imported on first use
    # only: `import ovfast` loads no test support code.
    if name == "build_checkpoint":
        from .testing.random_checkpoint import build_checkpoint

        return build_checkpoint
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
