"""TOML recipes, ``--set key=value`` overrides and the resolved config.  docs/DESIGN.md 2.

A recipe is a TOML file with one table per stage, named like the stage's config dataclass::

    [loop]            LoopConfig            (run directory, model, problems, steps ...)
    [rollout]         RolloutConfig
    [score_teachers]  ScoreTeachersConfig
    [polarize]        PolarizeConfig
    [train]           TrainConfig
    [eval]            EvalConfig
    [update_skills]   UpdateSkillsConfig    (nested: [update_skills.writer], [update_skills.params])

Precedence: dataclass defaults < TOML file < explicit CLI options < ``--set section.key=value``.
Values of ``--set`` are parsed as TOML literals (``1e-5``, ``true``, ``[1, 2]``, ``"text"``); anything
that is not a TOML literal is taken as a string.  An unknown section or key, or a value of the wrong
type, is an :class:`InputError` naming the file (or ``--set``) and the key.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
import types
import typing
from pathlib import Path
from typing import Any, Iterable, Mapping

from stages.engine.io import InputError

# the tables of a recipe, one per stage config (stages.loop.build_sections maps each to its dataclass)
SECTIONS = ("loop", "rollout", "score_teachers", "polarize", "train", "eval", "update_skills")


def check_section(name: str) -> None:
    if name not in SECTIONS:
        raise InputError(None, f"unknown config section '{name}' (known: {', '.join(SECTIONS)})")


def load_toml(path: str | os.PathLike) -> dict:
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "config file not found")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as e:
        raise InputError(path, f"invalid TOML ({e})") from None
    for k, v in data.items():
        if not isinstance(v, dict):
            raise InputError(path, f"top-level key '{k}' must be a section table")
    return data


def parse_value(text: str) -> Any:
    """A TOML literal (number, bool, string, array, inline table), else the raw string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def parse_sets(items: Iterable[str], default_section: str | None = None) -> dict:
    """``["train.lr=1e-5", "loop.steps=3"]`` -> ``{"train": {"lr": 1e-5}, "loop": {"steps": 3}}``."""
    out: dict[str, dict] = {}
    for item in items or ():
        if "=" not in item:
            raise InputError("--set", f"'{item}' must look like section.key=value")
        key, value = item.split("=", 1)
        key = key.strip().replace("-", "_")
        if "." in key:
            section, name = key.split(".", 1)
        elif default_section:
            section, name = default_section, key
        else:
            raise InputError("--set", f"'{item}': name the section, e.g. train.{key}=...")
        out.setdefault(section, {})[name] = parse_value(value.strip())
    return out


def merge(*layers: Mapping) -> dict:
    """Deep merge of section dicts, later layers win; None values of a layer are ignored."""
    out: dict[str, dict] = {}
    for layer in layers:
        for section, values in (layer or {}).items():
            dst = out.setdefault(section, {})
            for k, v in (values or {}).items():
                if v is not None:
                    dst[k] = v
    return out


def _coerce(value: Any, hint: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, where)
            except InputError as e:
                errors.append(e)
        raise errors[0] if errors else InputError(None, f"{where}: bad value {value!r}")
    if hint is Any:
        return value
    if dataclasses.is_dataclass(hint) and isinstance(hint, type):
        if dataclasses.is_dataclass(value):
            return value
        if not isinstance(value, dict):
            raise InputError(None, f"{where}: expected a table, got {value!r}")
        return build(hint, value, where)
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise InputError(None, f"{where}: expected true/false, got {value!r}")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise InputError(None, f"{where}: expected an integer, got {value!r}")
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise InputError(None, f"{where}: expected a number, got {value!r}")
    if hint is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise InputError(None, f"{where}: expected a string, got {value!r}")
    if origin in (list, tuple):
        if isinstance(value, str) and origin is list:
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise InputError(None, f"{where}: expected a list, got {value!r}")
        inner = args[0] if args else Any
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise InputError(None, f"{where}: expected {len(args)} values, got {value!r}")
            return tuple(_coerce(v, a, where) for v, a in zip(value, args))
        vals = [_coerce(v, inner, where) for v in value]
        return tuple(vals) if origin is tuple else vals
    if origin is dict or hint is dict:
        if not isinstance(value, dict):
            raise InputError(None, f"{where}: expected a table, got {value!r}")
        return value
    return value


def build(cls: type, values: Mapping[str, Any], section: str, source: str = "config", **fixed) -> Any:
    """Instantiate a config dataclass from a section dict; unknown keys and bad types are InputErrors."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kw: dict[str, Any] = {}
    for k, v in values.items():
        k2 = k.replace("-", "_")
        if k2 not in names:
            close = [n for n in sorted(names) if n.startswith(k2[:3])]
            hint = f" (did you mean {', '.join(close[:3])}?)" if close else ""
            raise InputError(source, f"unknown option '{section}.{k}'{hint}")
        try:
            kw[k2] = _coerce(v, hints[k2], f"{section}.{k2}")
        except InputError as e:
            raise InputError(source, e.problem) from None
    kw.update({k: v for k, v in fixed.items() if k in names})
    missing = [f.name for f in dataclasses.fields(cls)
               if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING and f.name not in kw]
    if missing:
        raise InputError(source, f"section '{section}' needs {', '.join(missing)}")
    return cls(**kw)


def resolve(path: str | os.PathLike | None = None, sets: Iterable[str] = (), cli: Mapping | None = None,
            default_section: str | None = None) -> tuple[dict, str]:
    """(merged sections, source label) from a TOML file, CLI options and ``--set`` overrides."""
    data = load_toml(path) if path else {}
    for section in data:
        check_section(section)
    over = parse_sets(sets, default_section)
    for section in over:
        check_section(section)
    return merge(data, cli or {}, over), (str(path) if path else "--set")


def resolved_dict(obj: Any) -> dict:
    return dataclasses.asdict(obj) if dataclasses.is_dataclass(obj) else dict(obj)
