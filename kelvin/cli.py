"""What the command lines (``train.py``, ``evaluate.py``, ``python -m kelvin.export``) share: errors as one line.

:func:`run_cli` runs a command's body and turns every exception into one line on stderr, with no
traceback: the message of a bad input (a config value, a path, a damaged file: the library's errors
name the file or field and the fix) with exit code 2; a failure to write (:class:`~kelvin.atomic.SaveError`)
or an unexpected error with exit code 1, the latter naming its type and pointing to ``--debug``, which
shows the full traceback. Warnings print as one ``warning: ...`` line each.
"""

from __future__ import annotations

import importlib
import signal
import sys
import warnings
from typing import Callable

from kelvin.atomic import SaveError

__all__ = ["run_cli", "run_main", "BAD_INPUT"]

BAD_INPUT = (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError, UnicodeError)
"""Errors of a user's input (configs, paths, files): ConfigError, RunDirError, EvaluationError, ArtifactError..."""


def _one_line_warning(message, category, filename, lineno, line=None) -> str:  # noqa: ARG001 (warnings.formatwarning)
    return f"warning: {message}\n"


def run_main(module: str, argv: list[str] | None = None) -> int:
    """The entry points' one line (``train.py``, ``evaluate.py``): import ``module`` (torch and the rest: seconds)
    and return its ``main(argv)``; a Ctrl-C during that import exits 130 with one line, as one later does."""
    try:
        main = importlib.import_module(module).main
    except KeyboardInterrupt:
        print("interrupted (SIGINT)", file=sys.stderr)
        return 128 + signal.SIGINT.value
    return main(argv)


def _message(exc: BaseException) -> str:
    """An exception's message on one line: a pydantic ValidationError (a settings object rebuilt by the code with a
    value it does not take) is named field by field, not dumped."""
    from pydantic import ValidationError

    if not isinstance(exc, ValidationError):
        return str(exc)
    parts = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"])
        message = str(err.get("ctx", {}).get("error", err["msg"]))
        parts.append(f"{exc.title}{'.' + where if where else ''}: {message}")
    return "; ".join(dict.fromkeys(parts))


def run_cli(body: Callable[[], int], debug: bool = False) -> int:
    """``body()``'s exit code; an exception becomes one line on stderr (re-raised as it is when ``debug``)."""
    previous = warnings.formatwarning
    if not debug:
        warnings.formatwarning = _one_line_warning
    try:
        return body()
    except KeyboardInterrupt as exc:  # Ctrl-C, or a second SIGINT/SIGTERM (kelvin.callbacks.TrainingStop names it)
        if debug:
            raise
        name = exc.args[0] if exc.args and exc.args[0] in signal.Signals.__members__ else "SIGINT"
        print(f"interrupted ({name})", file=sys.stderr)
        return 128 + signal.Signals[name].value
    except Exception as exc:
        if debug:
            raise
        if isinstance(exc, SaveError):
            print(f"error: {exc}", file=sys.stderr)
            return 1
        if isinstance(exc, BAD_INPUT):
            print(f"error: {_message(exc)}", file=sys.stderr)
            return 2
        print(f"error: unexpected {type(exc).__name__}: {exc} (rerun with --debug for the traceback)", file=sys.stderr)
        return 1
    finally:
        warnings.formatwarning = previous
