"""Command line: `captioner COMMAND ...`.

    parser.py     every subcommand's options (no torch: --help and argument errors answer at once)
    commands.py   one function per subcommand, calling the function that does the work

User mistakes (missing files, bad data, bad model folders) end in one line on stderr and exit
status 2, never a traceback.
"""

from __future__ import annotations

import errno
import os
import sys
import warnings

from captioner.cli.parser import build_parser
from captioner.errors import CaptionerError, CaptionerWarning

__all__ = ["build_parser", "main"]

# Mistakes a user can make and fix: one line, exit status 2. Anything else is a bug and keeps its traceback.
USER_ERRORS = (CaptionerError, FileNotFoundError, NotADirectoryError, PermissionError)
# ... and what a disk can say: full, read-only, over quota (permission denied is a PermissionError, above).
# What was written is complete or cleaned up: see files.atomic_write.
DISK_ERRORS = (errno.ENOSPC, errno.EROFS, errno.EDQUOT)


def _one_line_warnings() -> None:
    """Our warnings as one line each; those of torch and others keep their own form (file and line)."""
    default = warnings.formatwarning

    def format_warning(message, category, *rest, **kw) -> str:
        if issubclass(category, CaptionerWarning):
            return f"captioner: warning: {message}\n"
        return default(message, category, *rest, **kw)

    warnings.formatwarning = format_warning


def main(argv: list[str] | None = None) -> int:
    _one_line_warnings()
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    if getattr(args, "threads", None):  # read where torch's threads are set (threads.py), and by torchrun's children
        os.environ["CAPTIONER_THREADS"] = str(args.threads)
    try:
        from captioner.cli.commands import COMMANDS, check_paths

        check_paths(args)  # before anything loads
        return COMMANDS[args.command](args)
    except USER_ERRORS as e:
        print(f"captioner: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        if e.errno not in DISK_ERRORS:
            raise
        print(f"captioner: error: {e.filename or 'writing'}: {e.strerror}", file=sys.stderr)
        return 2
    except (MemoryError, RuntimeError) as e:
        if not _out_of_memory(e):
            raise
        print(f"captioner: error: out of memory ({_first_line(e)}); fewer images at a time (--batch-size) need "
              "less", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("captioner: interrupted", file=sys.stderr)
        return 130


def _out_of_memory(e: BaseException) -> bool:
    """Python's MemoryError, torch's on a GPU (OutOfMemoryError, a RuntimeError) and its CPU
    allocator's RuntimeError, which only its message tells apart."""
    return isinstance(e, MemoryError) or type(e).__name__ == "OutOfMemoryError" or (
        "can't allocate memory" in str(e) or "out of memory" in str(e).lower())


def _first_line(e: BaseException) -> str:
    """What an error says first, without torch's '[enforce fail at alloc_cpu.cpp:...]' prefix."""
    line = (str(e).strip().splitlines() or [type(e).__name__])[0]
    return line.split("] . ", 1)[-1][:200]
