"""Typed configs: frozen dataclasses that generate their flags and their run names.

A study's configuration is a tree of frozen dataclasses (a model, data, an
optimizer, the methods' own small dataclasses, ...). From it:

* `define_flags(Config(), flag_values)` defines one absl flag per field (of
  nested configs too), with the config's defaults, help from the field's
  metadata, and the type from its annotation (bool, int, float, str,
  Optional[...], tuple[...] as a comma list, str with `choices` as an enum);
  `from_flags(Config, flag_values)` reads them back. A config and its flags
  cannot drift apart, and a program's `--helpfull` lists only what its
  config has. The library never reads absl flags itself: programs pass
  their `FlagValues`.
* `nondefault(config)` is the dict of the fields that differ from their
  defaults (recursively): what names a run (open_lth's rule, so adding a
  field with a default renames no run).

Field metadata (`dataclasses.field(metadata={...})`):
  help: the flag's help text;
  flag: the flag's name (default: the prefix + the field's name), or False
        for a field that is not a flag;
  choices: the allowed values of a str field;
  prefix: for a nested config, the prefix of its fields' flags (default "");
  operational: True for a field that does not change results (block size,
        where data lives, ...): left out of `nondefault`.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from typing import Optional

_MISSING = dataclasses.MISSING


def _hints(cls) -> dict:
  return typing.get_type_hints(cls)


def _unwrap_optional(tp):
  """(inner type, is_optional) of Optional[X] / X | None."""
  origin = typing.get_origin(tp)
  if origin in (typing.Union, types.UnionType):
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if len(args) == 1 and len(typing.get_args(tp)) == 2:
      return args[0], True
  return tp, False


def _default(f: dataclasses.Field):
  if f.default is not _MISSING:
    return f.default
  if f.default_factory is not _MISSING:
    return f.default_factory()
  raise TypeError(f"config field {f.name} has no default")


def _flag_name(prefix: str, f: dataclasses.Field) -> Optional[str]:
  name = f.metadata.get("flag")
  if name is False:
    return None
  return name or prefix + f.name


def _is_config(tp) -> bool:
  return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def flag_fields(cls, prefix: str = ""):
  """Yields (flag name, field, type, owning dataclass, path) for every flag of `cls`."""
  hints = _hints(cls)
  for f in dataclasses.fields(cls):
    tp = hints[f.name]
    inner, _ = _unwrap_optional(tp)
    if _is_config(inner):
      sub_prefix = prefix + f.metadata.get("prefix", "")
      for item in flag_fields(inner, sub_prefix):
        yield item[0], item[1], item[2], item[3], (f.name, *item[4])
      continue
    name = _flag_name(prefix, f)
    if name is not None:
      yield name, f, tp, cls, (f.name,)


def _get_path(obj, path):
  for p in path:
    obj = getattr(obj, p)
  return obj


def define_flags(config, flag_values, prefix: str = "") -> list[str]:
  """Defines a flag for every field of `config` (an instance: its values are
  the defaults) in `flag_values`; returns the flag names."""
  from absl import flags
  names = []
  for name, f, tp, _, path in flag_fields(type(config), prefix):
    default = _get_path(config, path)
    inner, optional = _unwrap_optional(tp)
    help_text = f.metadata.get("help", f.name.replace("_", " "))
    origin = typing.get_origin(inner)
    kw = {"flag_values": flag_values}
    if inner is bool:
      flags.DEFINE_bool(name, default, help_text, **kw)
    elif inner is int:
      flags.DEFINE_integer(name, default, help_text, **kw)
    elif inner is float:
      flags.DEFINE_float(name, default, help_text, **kw)
    elif inner is str and "choices" in f.metadata:
      flags.DEFINE_enum(name, default, list(f.metadata["choices"]), help_text, **kw)
    elif inner is str:
      flags.DEFINE_string(name, default, help_text, **kw)
    elif origin in (tuple, list) or inner in (tuple, list):
      flags.DEFINE_list(name, None if default is None else [str(v) for v in default],
                        help_text, **kw)
    else:
      raise TypeError(f"config field {f.name}: no flag type for {tp}")
    del optional
    names.append(name)
  return names


def _convert_list(values, tp, name: str):
  inner, _ = _unwrap_optional(tp)
  args = typing.get_args(inner)
  elem = args[0] if args else str
  out = []
  for v in values:
    v = str(v).strip()
    if not v:
      continue
    try:
      out.append(elem(v) if elem in (int, float) else v)
    except ValueError:
      raise ValueError(f"--{name}: {v!r} is not a{'n int' if elem is int else ' number'}") from None
  return tuple(out)


def from_flags(cls, flag_values, prefix: str = ""):
  """An instance of `cls` from the flags `define_flags` made."""
  hints = _hints(cls)
  kwargs = {}
  for f in dataclasses.fields(cls):
    tp = hints[f.name]
    inner, _ = _unwrap_optional(tp)
    if _is_config(inner):
      kwargs[f.name] = from_flags(inner, flag_values, prefix + f.metadata.get("prefix", ""))
      continue
    name = _flag_name(prefix, f)
    if name is None or name not in flag_values:
      continue
    value = flag_values[name].value
    if isinstance(value, list):
      value = _convert_list(value, tp, name)
    kwargs[f.name] = value
  return cls(**kwargs)


def to_dict(config) -> dict:
  """All fields, recursively, as JSON-able values (tuples as lists)."""
  out = {}
  for f in dataclasses.fields(config):
    out[f.name] = _plain(getattr(config, f.name))
  return out


def _plain(v):
  if dataclasses.is_dataclass(v) and not isinstance(v, type):
    return to_dict(v)
  if isinstance(v, (tuple, list)):
    return [_plain(x) for x in v]
  if isinstance(v, dict):
    return {str(k): _plain(x) for k, x in v.items()}
  return v


def nondefault(config, *, operational: bool = False) -> dict:
  """The fields of `config` that differ from their defaults, recursively
  (a nested config appears when any of its fields differs). Fields marked
  `operational` are left out unless `operational=True`."""
  out = {}
  for f in dataclasses.fields(config):
    if f.metadata.get("operational") and not operational:
      continue
    v = getattr(config, f.name)
    if dataclasses.is_dataclass(v) and not isinstance(v, type):
      sub = nondefault(v, operational=operational)
      if sub:
        out[f.name] = sub
      continue
    try:
      d = _default(f)
    except TypeError:
      d = _MISSING
    if d is _MISSING or _plain(v) != _plain(d):
      out[f.name] = _plain(v)
  return out


def replace(config, **changes):
  """`dataclasses.replace`, for configs."""
  return dataclasses.replace(config, **changes)

