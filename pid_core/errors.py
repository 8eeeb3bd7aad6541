"""Errors a user can act on.

Every error raised for bad input is a PidError whose message names the problem and the fix, so the
command line and the ComfyUI nodes can show it as is, without a traceback.
"""


class PidError(Exception):
    """Base class: a problem with the user's input, explained in the message."""


class CheckpointError(PidError):
    """The file is missing, unreadable, unsafe, or not a PiD checkpoint."""


class LatentError(PidError):
    """The latent does not fit the checkpoint (channels, format, size, batch)."""


class TextEmbeddingError(PidError):
    """The text embedding or text encoder does not fit PiD (width, length, encoder)."""


class SizeError(PidError):
    """The requested output size cannot be produced."""
