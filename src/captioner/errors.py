"""The project's own error types: a user's mistake, reported as one line naming the file or option.

The command line turns any `CaptionerError` into ``captioner: error: <message>`` and exit status 2.
Anything else (a bare ValueError, a RuntimeError from a library) is a bug in captioner or in its
dependencies and keeps its traceback, so it can be reported and fixed instead of being hidden.
"""

from __future__ import annotations


class CaptionerError(Exception):
    """Base of every error a user can cause and fix: bad options, data, images, model folders."""


class ConfigError(CaptionerError):
    """An option or setting that cannot be used (a value out of range, two options that clash)."""


class DataError(CaptionerError):
    """A dataset that cannot be used; the message names the file and the problem."""


class ImageError(CaptionerError):
    """An image that cannot be used; the message names the file and the reason."""


class ImageTooLarge(ImageError):
    """An image over a pixel limit (more pixels than allowed, or a decompression bomb): the server's
    413, where any other unreadable image is a 415."""


class ModelError(CaptionerError):
    """A model folder that cannot be used; one line naming the folder and the problem."""


class EncoderError(CaptionerError):
    """A backbone or weights problem, reported as one line."""


class LibraryError(CaptionerError):
    """A photo database that cannot be used; one line naming the file and the problem."""


class ExportError(CaptionerError):
    """An export that cannot be done, in one line."""


class TrainingError(CaptionerError):
    """A training run that cannot go on (the loss became NaN or infinite); what is saved is kept."""


class CaptionerWarning(UserWarning):
    """Something left out or read differently, so that the work could go on (malformed lines,
    unreadable images, a non-UTF-8 file). The command line prints these as
    ``captioner: warning: <message>``; other libraries' warnings keep their own form."""
