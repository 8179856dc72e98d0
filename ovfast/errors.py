"""Typed errors. Everything ovfast raises on purpose derives from OvfastError.

Input errors are raised while a request is being prepared, before it touches the KV cache,
so the engine that raised one serves the next request normally.
"""


class OvfastError(Exception):
    """Base class of every error ovfast raises on purpose."""


class ModelLoadError(OvfastError):
    """The model could not be found, downloaded or loaded."""


class ConfigError(ModelLoadError):
    """config.json (or another checkpoint file) describes something ovfast cannot run."""


class InputError(OvfastError, ValueError):
    """A request is malformed; the message names the problem."""


class UnsupportedInputError(InputError, TypeError):
    """An image, video or prompt argument has a type ovfast does not accept."""


class ImageReadError(InputError):
    """An image (or video frame) could not be read or decoded."""


class ImageTooLargeError(ImageReadError):
    """An encoded image (or video frame) has more pixels than the configured limit."""


class VideoReadError(ImageReadError):
    """A video file or its bytes could not be opened, indexed or decoded."""


class EmptyVideoError(InputError):
    """A video has no frames."""


class PromptError(InputError):
    """The prompt has no tokens to run, or is not valid Unicode text (a lone surrogate)."""


class PlaceholderError(InputError):
    """The prompt's <image>/<video> placeholders do not match the media passed."""


class TooManyImagesError(InputError):
    """More images or video frames than the engine is configured for."""


class ContextLengthError(InputError):
    """Prompt tokens plus max_new_tokens do not fit in the engine's context."""


class EmptyContinuationError(InputError):
    """A loglikelihood request whose continuation has no tokens: there is nothing to score."""


class GenerationParamsError(InputError):
    """A sampling or stopping parameter is out of range."""


class EngineBusyError(OvfastError):
    """The engine cannot take the request now: it is closed, or (``EngineOverloadedError``) full."""


class EngineOverloadedError(EngineBusyError):
    """More requests are waiting than the engine's ``max_queue``; retry later (HTTP 429)."""


class MediaAccessError(InputError):
    """A media URL the server may not or could not fetch (domain not allowed, too big, too slow)."""


class GrammarError(GenerationParamsError):
    """A structured-output constraint (``response_format``, ``regex``, ``choice``, ``grammar``) is
    malformed, uses a JSON-schema keyword that cannot be enforced, or does not compile."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param  # the request parameter at fault ("response_format", "regex", ...)


class StructuredOutputsUnavailableError(GenerationParamsError):
    """A constrained request on an install without xgrammar (the ``structured`` extra)."""
