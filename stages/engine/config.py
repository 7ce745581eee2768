"""TOML recipes, ``--set key=value`` overrides and the resolved config.  docs/DESIGN.md 2.

A recipe is a TOML file with one table per stage, named like the stage's config dataclass::

    [loop]            LoopConfig            (run directory, model, problems, steps ...)
    [rollout]         RolloutConfig
    [score_teachers]  ScoreTeachersConfig
    [polarize]        PolarizeConfig
    [train]           TrainConfig
    [eval]            EvalConfig
    [update_skills]   UpdateSkillsConfig    (nested: [update_skills.writer], [update_skills.params])
    [mine_skills]     MineSkillsConfig
    [build_index]     BuildIndexConfig
    [sft]             SFTConfig
    [export]          ExportConfig

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

from stages.engine.errors import InputError

# the tables of a recipe, one per stage config (each command reads its own; stages.loop.build_sections maps the
# loop's to their dataclasses)
SECTIONS = ("loop", "rollout", "score_teachers", "polarize", "train", "eval", "update_skills", "mine_skills", "build_index",
            "sft", "export")


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
    renamed = old_keys(cls)
    kw: dict[str, Any] = {}
    for k, v in values.items():
        k2 = k.replace("-", "_")
        if k2 not in names and k2 in renamed:
            deprecated(f"'{section}.{k}'", f"'{section}.{renamed[k2]}'")
            if renamed[k2] in values:
                continue  # the new key, given too, wins
            k2 = renamed[k2]
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
    try:
        return cls(**kw)
    except InputError as e:  # a range check of Checked.__post_init__
        raise InputError(source if source != "config" else e.path, e.problem) from None


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


# --------------------------------------------------------------------------------------------------
# documented, range-checked config fields: the one place a stage option is declared
#
# A stage config is a dataclass deriving from Checked whose fields are declared with opt(): the default,
# the help text, the help panel (group), the CLI flag and the accepted values live beside the field.  The
# CLI (sgsd_cli/options.py) generates its options from these fields, recipes fill them from TOML, and
# check() refuses out-of-range values wherever the config is built (CLI, TOML, --set, in-process).


def opt(default: Any = dataclasses.MISSING, help: str = "", *, group: str = "Options", flag: str | None = None,
        choices: Iterable[Any] | None = None, ge: float | None = None, gt: float | None = None,
        le: float | None = None, lt: float | None = None, factory: Any = dataclasses.MISSING, cli: bool = True,
        prefix: str | None = None, metavar: str | None = None, what: str | None = None,
        old: Iterable[str] = (), key: bool | str = True) -> Any:
    """A config field with its documentation and checks.

    ``flag``: the CLI name without dashes (default: the field name with '-' for '_'); ``cli=False`` keeps a
    field out of the CLI (TOML/--set only); ``prefix``: for a nested config, the prefix of its fields' flags;
    ``choices``/``ge``/``gt``/``le``/``lt``: accepted values (None is always accepted for Optional fields);
    ``what``: the noun an error names for a value outside ``choices`` (default: the option); ``old``: former
    names that keep working with a one-line deprecation notice, ``--flag`` for a CLI flag, a bare word for a
    TOML / ``--set`` key.  ``key``: whether the field is part of the stage key (:func:`stage_key`, what makes an
    output stale): True; False for runtime-only fields (device, logging, snapshot cadence: they do not change the
    result); ``"if-set"`` for a field added later whose ``None`` default must not make older outputs stale."""
    md = {"help": help, "group": group, "flag": flag, "choices": tuple(choices) if choices is not None else None,
          "ge": ge, "gt": gt, "le": le, "lt": lt, "cli": cli, "prefix": prefix, "metavar": metavar, "what": what,
          "old": tuple(old), "key": key}
    if factory is not dataclasses.MISSING:
        if default is not dataclasses.MISSING:
            raise TypeError("opt(): give either a default or a factory, not both")
        return dataclasses.field(default_factory=factory, metadata={"opt": md})
    return dataclasses.field(default=default, metadata={"opt": md})


# fields many stage configs share, declared once (``shared_opt("device", group="Model")``)
SHARED = {
    "gguf_file": dict(default=None, help="GGUF file name inside the --model folder (transformers dequantizes it on load)."),
    "device": dict(default="auto", help="torch device: auto, cpu, cuda, cuda:1 ...", key=False),
    "dtype": dict(default="auto", help="Model dtype: auto (bf16 on GPUs that support it, else fp32), fp32, bf16, fp16.",
                  choices=("auto", "fp32", "float32", "bf16", "bfloat16", "fp16", "float16")),
}


def shared_opt(name: str, *, group: str) -> Any:
    """The shared declaration of field ``name`` (:data:`SHARED`) in a stage config's help panel ``group``."""
    d = dict(SHARED[name])
    return opt(d.pop("default"), d.pop("help"), group=group, **d)


def field_opt(f: dataclasses.Field) -> dict:
    return f.metadata.get("opt", {"help": "", "group": "Options", "flag": None, "choices": None, "ge": None,
                                  "gt": None, "le": None, "lt": None, "cli": True, "prefix": None, "metavar": None,
                                  "what": None, "old": (), "key": True})


def runtime_fields(cls_or_obj: Any) -> tuple[str, ...]:
    """The fields of a config declared ``opt(..., key=False)``."""
    return tuple(f.name for f in dataclasses.fields(cls_or_obj) if field_opt(f).get("key", True) is False)


def stage_key(obj: Any) -> Any:
    """The JSON form of a config (or of a dict / list holding configs) without its runtime-only fields: what a
    stage's manifest records as its config and compares on a rerun.  Every stage strips the same fields."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        out = {}
        for f in dataclasses.fields(obj):
            k, v = field_opt(f).get("key", True), getattr(obj, f.name)
            if k is False or (k == "if-set" and v is None):
                continue
            out[f.name] = stage_key(v)
        return out
    if isinstance(obj, Mapping):
        return {str(k): stage_key(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set)):
        return [stage_key(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    return str(obj)


def runtime_names(obj: Any) -> set[str]:
    """Every runtime-only field name of the configs inside ``obj`` (a config, or a dict / list holding configs)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        out = set(runtime_fields(obj))
        for f in dataclasses.fields(obj):
            out |= runtime_names(getattr(obj, f.name))
        return out
    if isinstance(obj, Mapping):
        return set().union(*(runtime_names(v) for v in obj.values())) if obj else set()
    if isinstance(obj, (list, tuple)):
        return set().union(*(runtime_names(v) for v in obj)) if obj else set()
    return set()


_NOTICED: set[str] = set()


def deprecated(old: str, new: str) -> None:
    """One line on stderr, once per process and name: ``old`` still works but is now called ``new``."""
    import sys

    if old not in _NOTICED:
        _NOTICED.add(old)
        print(f"note: {old} is deprecated and will be removed; use {new}", file=sys.stderr, flush=True)


def old_keys(cls: type) -> dict[str, str]:
    """Former TOML / --set keys of a config's fields -> their field names."""
    out: dict[str, str] = {}
    for f in dataclasses.fields(cls):
        for o in field_opt(f).get("old", ()):
            if not o.startswith("--"):
                out[o.replace("-", "_")] = f.name
    return out


def flag_of(f: dataclasses.Field, prefix: str = "") -> str:
    o = field_opt(f)
    return prefix + (o["flag"] or f.name.replace("_", "-"))


def _range_text(o: dict) -> str:
    parts = []
    if o["ge"] is not None:
        parts.append(f">= {o['ge']:g}")
    if o["gt"] is not None:
        parts.append(f"> {o['gt']:g}")
    if o["le"] is not None:
        parts.append(f"<= {o['le']:g}")
    if o["lt"] is not None:
        parts.append(f"< {o['lt']:g}")
    return " and ".join(parts)


def check(cfg: Any, section: str = "", prefix: str = "") -> None:
    """Refuse values outside a field's declared choices or range, and non-finite numbers (InputError)."""
    import math

    for f in dataclasses.fields(cfg):
        o, v = field_opt(f), getattr(cfg, f.name)
        name = f"--{flag_of(f, prefix)}" + (f" ({section}.{f.name})" if section else "")
        if dataclasses.is_dataclass(v):
            check(v, f"{section}.{f.name}" if section else f.name, prefix + (o["prefix"] or ""))
            continue
        if v is None:
            continue
        if o["choices"] is not None and v not in o["choices"]:
            allowed = ", ".join(str(c) for c in o["choices"] if c != "")
            if o.get("what"):
                raise InputError(None, f"{name}: unknown {o['what']} {v!r} (use one of {allowed})")
            raise InputError(None, f"{name} must be one of {allowed} (got {v!r})")
        if isinstance(v, float) and not math.isfinite(v):
            raise InputError(None, f"{name} must be a finite number (got {v})")
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            bad = ((o["ge"] is not None and v < o["ge"]) or (o["gt"] is not None and v <= o["gt"])
                   or (o["le"] is not None and v > o["le"]) or (o["lt"] is not None and v >= o["lt"]))
            if bad:
                raise InputError(None, f"{name} must be {_range_text(o)} (got {v})")


class Checked:
    """Base of the stage configs: every construction (CLI, TOML, --set, ``dataclasses.replace``) is checked."""

    def __post_init__(self) -> None:
        check(self)
