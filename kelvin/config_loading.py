"""Loading a Kelvin config: the YAML reader, ``--set`` overrides, moved keys, and one-line errors.

The blocks themselves (their fields, defaults and ranges) are :mod:`kelvin.config`; this module reads a
file into them.

**Checked once, when the config loads, before any model loads.** Every field of every block is
checked against its annotation and its documented range; an error is one line naming the field, the
value and the fix, e.g. ``env.batch_size='four': must be an integer >= 1 (e.g. env.batch_size: 16)``.
An empty or non-mapping file, an unknown block or key (with the closest valid one suggested), a key
that moved (``env.t_min`` is now ``env.action.t_min``) and a ``--set`` without a value are errors too.

Files are read with a ``yaml.SafeLoader`` that also reads ``1e-4`` as a float; ``--set
block.key=value`` (or ``block.sub.key=value``) overrides parse their value as YAML (``1e-4``,
``null``, ``[0.5, 1.0]``).
"""

from __future__ import annotations

import re
import types
import typing
from dataclasses import asdict, fields, is_dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import annotated_types
import yaml
from pydantic import ValidationError
from pydantic.fields import FieldInfo

from kelvin.config import PPO_RESERVED, ConfigError, KelvinConfig, _yaml_value
from policies.features import RENAMED_SETTINGS
from samplers.suggest import did_you_mean

__all__ = ["MOVED_KEYS", "apply_overrides", "load_config"]


class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads ``1e-4`` as a float (YAML 1.1 wants ``1.0e-4``) and refuses a key given twice in
    one mapping (plain YAML keeps the last silently: one of the two settings would be lost)."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: dict = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue  # `<<: *base` then a key: an override, as YAML means it
                key = self.construct_object(key_node, deep=True)
                line = key_node.start_mark.line + 1
                try:
                    first = seen.get(key)
                except TypeError:  # an unhashable key: the base class says so
                    continue
                if first is not None:
                    raise ConfigError(f"key {key!r} is given twice, at line {first} and line {line}; keep one (YAML "
                                      "would silently use the last)")
                seen[key] = line
        return super().construct_mapping(node, deep=deep)


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
    |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
    |\.[0-9_]+(?:[eE][-+][0-9]+)?
    |[-+]?\.(?:inf|Inf|INF)
    |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."),
)


def _yaml_load(text: str):
    return yaml.load(text, Loader=_Loader)


MOVED_KEYS = {
    "env.action_mapping": "env.action.kind",
    **{f"env.{k}": f"env.action.{k}" for k in ("t_min", "t_max", "min_abs_temperature", "max_delta")},
    **{f"env.{k}": f"env.truncation.{k}" for k in ("top_k", "top_p", "min_p", "top_n_sigma")},
    "env.features.horizon": "env.max_new_tokens",
    "env.features.categories": "env.include_category",
}
"""Keys of older configs and where the setting lives now (an old key is an error that names the new one)."""


# ---------------------------------------------------------------------- error messages
def _unwrap(tp) -> tuple[Any, list]:
    """``(type, metadata)`` with every ``Annotated`` layer peeled off (FieldInfo metadata flattened)."""
    metas: list = []
    while typing.get_origin(tp) is Annotated:
        tp, *extra = typing.get_args(tp)
        metas += extra
    flat = []
    for m in metas:
        flat += m.metadata if isinstance(m, FieldInfo) else [m]
    return tp, flat


def _num(x) -> str:
    return f"{x:g}" if isinstance(x, float) else str(x)


def _range(metas: list) -> str:
    """`` >= 1``, `` in (0, 1]``, ... from annotated-types bounds."""
    lo = hi = None
    for m in metas:
        if isinstance(m, annotated_types.Ge):
            lo = ("[", m.ge)
        elif isinstance(m, annotated_types.Gt):
            lo = ("(", m.gt)
        elif isinstance(m, annotated_types.Le):
            hi = ("]", m.le)
        elif isinstance(m, annotated_types.Lt):
            hi = (")", m.lt)
    if lo and hi:
        return f" in {lo[0]}{_num(lo[1])}, {_num(hi[1])}{hi[0]}"
    if lo:
        return f" {'>=' if lo[0] == '[' else '>'} {_num(lo[1])}"
    if hi:
        return f" {'<=' if hi[0] == ']' else '<'} {_num(hi[1])}"
    return ""


def _describe(tp, metas: list = (), plural: bool = False) -> str:
    """What a value of annotation ``tp`` must be, in words: ``an integer >= 1``, ``a list of finite numbers``."""
    tp, inner = _unwrap(tp)
    metas = [*metas, *inner]
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (Union, types.UnionType):
        parts = [_describe(a, metas if len(args) == 2 else (), plural) for a in args if a is not type(None)]
        return " or ".join(parts) + (", or null" if type(None) in args else "")
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin in (list, tuple):
        at_least = next((m.min_length for m in metas if isinstance(m, annotated_types.MinLen)), 0)
        text = ("lists of " if plural else "a list of ") + _describe(args[0], (), plural=True)
        return text + (f", at least {at_least}" if at_least else "")
    if is_dataclass(tp):
        return ("mappings" if plural else "a mapping") + " with keys " + ", ".join(f.name for f in fields(tp))
    finite = any(getattr(m, "allow_inf_nan", True) is False for m in metas)
    nouns = {bool: ("true or false", "true/false values"), int: ("an integer", "integers"),
             float: ("a finite number", "finite numbers") if finite else ("a number", "numbers"),
             str: ("a string", "strings")}
    noun = nouns.get(tp, (f"a {getattr(tp, '__name__', tp)}", f"{getattr(tp, '__name__', tp)} values"))[plural]
    return noun + _range(metas)


def _field_info(cls, name: str) -> FieldInfo | None:
    return getattr(cls, "__pydantic_fields__", {}).get(name)


def _example(info: FieldInfo) -> str | None:
    """An example value for a field: its first ``examples`` entry, else its default (None: no good example)."""
    if info.examples:
        return _yaml_value(info.examples[0])
    default = info.default_factory() if info.default_factory is not None else info.default
    if default is None or is_dataclass(default):
        return None
    return _yaml_value(default)


def _walk(loc: tuple) -> tuple[list[str], Any, FieldInfo | None, Any]:
    """Follow an error location through the blocks: (field path, the class holding the last field, its
    FieldInfo, the class of the last field when it is a block)."""
    cls, path, info, holder = KelvinConfig, [], None, None
    for item in loc:
        field = _field_info(cls, item) if isinstance(item, str) and cls is not None else None
        if field is None:
            break
        holder, info, path = cls, field, [*path, item]
        tp, _ = _unwrap(field.annotation)
        cls = tp if is_dataclass(tp) else None
    return path, holder, info, cls


def _lookup(raw: dict, path: list[str]):
    value = raw
    for key in path:
        if not isinstance(value, dict) or key not in value:
            return None
        value = value[key]
    return value


def _error_line(err: dict, raw: dict) -> str:
    """One line for one pydantic error: the field, the value, what it must be and an example."""
    loc = tuple(err["loc"])
    if err["type"] == "unexpected_keyword_argument":
        path, _, _, block = _walk(loc[:-1])
        key = str(loc[-1])
        full = ".".join([*path, key])
        valid = [f.name for f in fields(block or KelvinConfig)]
        what = "block" if not path else "key"
        return f"unknown {what} {full}; {did_you_mean(key, valid)}"
    path, _, info, block = _walk(loc)
    where = ".".join(path)
    if err["type"] == "value_error":
        message = str(err.get("ctx", {}).get("error", err["msg"]))
        return f"{where}: {message}" if where else message
    if info is None:
        return f"{where or 'config'}: {err['msg']}"
    value = _lookup(raw, path)
    line = f"{where}={value!r}: must be {_describe(info.annotation, info.metadata)}"
    example = None if block is not None else _example(info)
    return line + (f" (e.g. {where}: {example})" if example is not None else "")


def _check_keys(raw: dict) -> None:
    """Moved keys and PPO arguments Kelvin sets itself: errors that say where the setting lives."""
    for block, values in raw.items():
        if not isinstance(values, dict):
            continue
        for key, value in values.items():
            path = f"{block}.{key}"
            if path in MOVED_KEYS:
                new = MOVED_KEYS[path]
                raise ConfigError(f"{path} is now {new}: write `{new}: {_yaml_value(value)}` in the YAML "
                                  f"(or --set {new}=...)")
            if block == "ppo" and key in PPO_RESERVED:
                raise ConfigError(f"ppo.{key} is set by Kelvin; {PPO_RESERVED[key]}")
            if isinstance(value, dict):
                for sub in value:
                    if f"{path}.{sub}" in MOVED_KEYS:
                        raise ConfigError(f"{path}.{sub} is set by Kelvin from {MOVED_KEYS[f'{path}.{sub}']}; "
                                          f"remove it")


def _build(raw, source: str) -> KelvinConfig:
    if not isinstance(raw, dict):
        kind = "empty" if raw is None else f"a {type(raw).__name__}, not a mapping of blocks"
        raise ConfigError(f"{source} is {kind}: a config is a mapping of blocks (model, env, reward, ppo, train, evaluation, policy); "
                          "write {} for the embedded defaults, or the blocks that differ from them")
    raw = {block: ({} if values is None else values) for block, values in raw.items()}
    bad = [block for block in raw if not isinstance(block, str)]
    if bad:
        raise ConfigError(f"{source}: block names must be words (model, env, reward, ppo, train, evaluation, policy); "
                          f"got {bad[0]!r}")
    try:
        _check_keys(raw)
        return KelvinConfig(**_onto_defaults(raw))
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None
    except ValidationError as exc:
        lines = [f"{source}: {_error_line(err, raw)}" for err in exc.errors()]
        raise ConfigError("\n".join(dict.fromkeys(lines))) from None


def _onto_defaults(raw: dict) -> dict:
    """``raw`` with every sub-block given as a mapping (``env.features: {position_bins: [4]}``, ``--set
    env.truncation.top_k=20``) laid over that sub-block's default, so the settings it does not name keep their
    defaults. Two defaults differ from their class's own (``env.features.include_diversity: true``,
    ``env.truncation.min_p: 0.02``): built from the mapping alone they were silently lost."""
    out = {}
    for block, values in raw.items():
        holder = _field_info(KelvinConfig, block) if isinstance(values, dict) else None
        if holder is None:
            out[block] = values
            continue
        values = dict(values)
        block_class = holder.default_factory().__class__ if holder.default_factory else None
        for key, given in values.items():
            info = _field_info(block_class, key)
            default = None if info is None or info.default_factory is None else info.default_factory()
            if isinstance(given, dict) and is_dataclass(default):
                old_names = {new for old, new in RENAMED_SETTINGS.items() if old in given}
                values[key] = {**{k: v for k, v in asdict(default).items() if k not in old_names}, **given}
        out[block] = values
    return out


def _field_at(path: list[str]) -> FieldInfo | None:
    """The FieldInfo of a dotted field path (``["env", "action", "t_min"]``), None when there is no such field."""
    found, _, info, _ = _walk(tuple(path))
    return info if found == path else None


def apply_overrides(raw: dict, overrides: list[str] | None) -> dict:
    """Apply ``block.key=value`` strings (value parsed as YAML) to a raw config mapping (copied)."""
    raw = {k: (dict(v) if isinstance(v, dict) else v) for k, v in (raw or {}).items()}
    for item in overrides or []:
        if "=" not in item or "." not in item.split("=", 1)[0]:
            raise ConfigError(f"--set {item!r}: expected block.key=value, e.g. --set ppo.learning_rate=1e-4")
        path, value = item.split("=", 1)
        parts = path.split(".")
        if value.strip() == "":
            info = _field_at(parts)
            example = None if info is None else _example(info)
            hint = f", e.g. --set {path}={example}" if example is not None else ""
            raise ConfigError(f"--set {item!r}: no value after '='; give one{hint} (null for an optional setting)")
        try:
            parsed = _yaml_load(value)
        except ConfigError as exc:
            raise ConfigError(f"--set {item!r}: {exc}") from None
        except yaml.YAMLError:
            parsed = value  # not YAML: the field's type check names it
        target = raw
        for part in parts[:-1]:
            child = target.get(part)
            if child is None:
                child = {}
            elif not isinstance(child, dict):
                raise ConfigError(f"--set {item!r}: {part!r} is not a block of settings")
            target[part] = child = dict(child)
            target = child
        target[parts[-1]] = parsed
    return raw


def load_config(path: str | Path | None = None, overrides: list[str] | None = None,
                training: bool = True) -> KelvinConfig:
    """Read a YAML config (None = the embedded defaults), apply overrides, check every block (and, when it is for
    ``training``, the rules only training needs: :meth:`KelvinConfig.check_training`).

    Raises :class:`ConfigError` (one line per problem) before anything heavy is loaded.
    """
    raw: dict = {}
    source = "defaults"
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {p} does not exist; pass --config with a YAML file such as "
                              "configs/default.yaml")
        try:
            raw = _yaml_load(p.read_text())
        except ConfigError as exc:
            raise ConfigError(f"{p}: {exc}") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"{p}: not valid YAML ({exc}); fix the syntax at the position shown") from exc
        except UnicodeDecodeError:
            raise ConfigError(f"{p} is not a text file; give a YAML config such as configs/default.yaml") from None
        source = str(p)
        if not isinstance(raw, dict):
            _build(raw, source)  # the empty / non-mapping error
    config = _build(apply_overrides(raw, overrides), source)
    if training:
        try:
            config.check_training()
        except ConfigError as exc:
            raise ConfigError(f"{source}: {exc}") from None
    return config
