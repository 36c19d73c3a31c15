"""``did you mean ...?`` for an unknown name: the one suggestion helper of Kelvin.

Standard library only, and part of the bottom layer beside :mod:`samplers.core` (which uses it for
:class:`~samplers.core.Truncation`'s keys), so every layer may import it: configs, prompts, policies, the
guard rails and the engine adapters all suggest names the same way (rl-zoo's ``train.py``, Gymnasium's
registry).
"""

from __future__ import annotations

import difflib
import warnings
from typing import Iterable, Mapping

__all__ = ["did_you_mean", "renamed"]


def did_you_mean(name, valid: Iterable[str], *, always_list: bool = False, cutoff: float = 0.6) -> str:
    """``"did you mean 'x'?"`` for the valid name closest to ``name`` (case-insensitive), else ``"valid: a, b"``.

    ``always_list`` adds the valid names after a suggestion too; ``cutoff``: how close a suggestion must be
    (difflib's ratio; raise it to flag only near-misses).
    """
    valid = [str(v) for v in valid]
    by_lower = {v.lower(): v for v in valid}
    close = difflib.get_close_matches(str(name), valid, n=1, cutoff=cutoff) or difflib.get_close_matches(
        str(name).lower(), list(by_lower), n=1, cutoff=cutoff)
    listing = f"valid: {', '.join(valid)}"
    if not close:
        return listing
    hint = f"did you mean {by_lower.get(close[0], close[0])!r}?"
    return f"{hint} ({listing})" if always_list else hint


def renamed(values, renames: Mapping[str, str], where: str):
    """The keyword arguments of a settings block (a dict, or pydantic's ``ArgsKwargs``) with each old name of
    ``renames`` (old -> new) under its new name, one ``FutureWarning`` per old name naming both (``where``: the
    block, e.g. ``env.features``); an old name beside its new one is a ``ValueError``. For a pydantic
    ``model_validator(mode="before")``: an old config, run directory or export still loads."""
    kwargs = getattr(values, "kwargs", values)
    if not isinstance(kwargs, dict) or not any(old in kwargs for old in renames):
        return values
    out = dict(kwargs)
    for old, new in renames.items():
        if old in out:
            if new in out:
                raise ValueError(f"{old} and {new} are both given; {old} is the old name of {new}: keep {new}")
            value = out.pop(old)
            shown = str(value).lower() if isinstance(value, bool) else repr(value)
            warnings.warn(f"{where}.{old} is now {where}.{new}: write `{new}: {shown}` in the YAML (the old name "
                          "still loads, for now)", FutureWarning, stacklevel=5)
            out[new] = value
    return type(values)(values.args, out) if hasattr(values, "kwargs") else out
