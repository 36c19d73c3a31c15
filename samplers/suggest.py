"""``did you mean ...?`` for an unknown name: the one suggestion helper of Kelvin.

Standard library only, and part of the bottom layer beside :mod:`samplers.core` (which uses it for
:class:`~samplers.core.Truncation`'s keys), so every layer may import it: configs, prompts, policies, the
guard rails and the engine adapters all suggest names the same way (rl-zoo's ``train.py``, Gymnasium's
registry).
"""

from __future__ import annotations

import difflib
from typing import Iterable

__all__ = ["did_you_mean"]


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
