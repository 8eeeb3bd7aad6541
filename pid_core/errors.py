"""Errors a user can act on.

Every error raised for bad input is a PidError whose one-line message names the problem and the fix,
so the command line and the ComfyUI nodes can show it without a traceback. What the message calls an
option is said in its reader's words (wording.py): str(exc) in the API's, render(CLI) or render(NODE)
in the command line's or a node's.
"""

from .wording import API, render


class PidError(Exception):
    """Base class: a problem with the user's input, explained in the message."""

    @property
    def template(self) -> str:
        """The message with its terms not yet rendered: what a message that wraps this one quotes."""
        return super().__str__()

    def render(self, context: str) -> str:
        """The message in the words of `context`: wording.API, CLI or NODE."""
        return render(self.template, context)

    def __str__(self) -> str:
        return self.render(API)


class CheckpointError(PidError):
    """The file is missing, unreadable, unsafe, or not a PiD checkpoint."""


class LatentError(PidError):
    """The latent does not fit the checkpoint (channels, format, size, batch)."""


class SigmaError(LatentError):
    """The noise level given for the latent (or stored with it) is not one it can carry."""


class TextEmbeddingError(PidError):
    """The text embedding or text encoder does not fit PiD (width, length, encoder)."""


class SizeError(PidError):
    """The requested output size cannot be produced."""


class ArgumentError(PidError, ValueError):
    """An argument of a call or a command-line option is of the wrong type or out of range."""


class DeviceError(PidError):
    """The requested device does not exist on this machine or in this PyTorch build."""


class OutputError(PidError):
    """The output file cannot be written where it was asked for."""


class DecodeError(PidError):
    """The decode itself failed: non-finite values, or not enough memory."""


class ColourReferenceError(PidError):
    """The colour reference does not fit the decoded image (aspect ratio, channels, batch, values)."""
