"""Stage commands generated from their config dataclasses: one way to wire a command.

:func:`stage_command` turns a stage config (fields declared with :func:`stages.engine.config.opt`) into typer
options, one per field, with the field's help, help panel, default and accepted values, plus ``--config``
(a TOML recipe: its table for this stage gives defaults), ``--set key=value`` (TOML literal; wins over
everything) and ``--dry-run`` (print the resolved config and exit).  Precedence: dataclass defaults < TOML <
options given on the command line < ``--set``.  The decorated function receives the built config and its own
parameters (run directory, input paths, ``--force``)::

    @stage_command("rollout", RolloutConfig, section="rollout")
    def rollout_cmd(cfg: RolloutConfig, run_dir: RunDir, force: Force = False) -> None: ...
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import json
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Callable

import typer

from sgsd_cli.common import PIPELINE, app, cli_errors, out
from stages.engine.config import build, deprecated, field_opt, flag_of, parse_sets, resolve
from stages.engine.atomic import to_jsonable
from stages.engine.errors import InputError

ConfigOpt = Annotated[Path | None, typer.Option("--config", help="TOML recipe; its table for this stage gives defaults for every option below.", rich_help_panel="Config")]
SetOpt = Annotated[list[str] | None, typer.Option("--set", metavar="KEY=VALUE", help="Override one option: key=value or section.key=value (TOML literal), repeatable; wins over --config and the options.", rich_help_panel="Config")]
DryRunOpt = Annotated[bool, typer.Option("--dry-run", help="Print the resolved config as JSON and exit without running.", rich_help_panel="Config", metavar="")]


def _scalar(hint: Any) -> tuple[Any, bool]:
    """(the CLI type of a field's type hint, whether it is a list)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        return _scalar(inner[0]) if len(inner) == 1 else (str, False)
    if origin is list:
        return (args[0] if args else str), True
    if origin is tuple or hint in (dict, Any) or origin is dict:
        return str, False
    return hint, False


def _default_text(v: Any) -> str:
    if v is None or v == "" or v == () or v == []:
        return ""
    if isinstance(v, bool):
        return "on" if v else "off"
    if isinstance(v, tuple):
        return "/".join(map(str, v))
    return str(v)


@dataclasses.dataclass
class _Param:
    path: tuple[str, ...]  # field path inside the config (nested configs: ("writer", "timeout_s"))
    name: str              # python parameter name
    flag: str
    kind: Any
    is_list: bool
    is_bool: bool
    convert: Callable[[Any], Any] | None
    old_of: str | None = None  # a former flag of the field: the new flag's name (deprecation notice)


def _params(cls: type, prefix: str = "", path: tuple[str, ...] = (), converters: dict | None = None,
            skip: set[str] = frozenset()) -> list[tuple[_Param, inspect.Parameter]]:
    out_: list[tuple[_Param, inspect.Parameter]] = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        o = field_opt(f)
        if not o["cli"] or ".".join(path + (f.name,)) in skip:
            continue
        hint = hints[f.name]
        if dataclasses.is_dataclass(hint):
            out_ += _params(hint, prefix + (o["prefix"] or ""), path + (f.name,), converters, skip)
            continue
        flag = flag_of(f, prefix)
        kind, is_list = _scalar(hint)
        is_bool = kind is bool
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        text = (o["help"] or "").replace("[", r"\[")
        extra = []
        if o["choices"] is not None:
            extra.append("one of " + ", ".join(str(c) for c in o["choices"] if c != ""))
        rng = ""
        from stages.engine.config import _range_text

        rng = _range_text(o)
        if rng:
            extra.append(rng)
        if extra:
            text += f" ({'; '.join(extra)})"
        shown = _default_text(default)
        if required:
            text += r" \[required]"
        elif shown:
            text += rf" \[default: {shown}]"
        decls = [f"--{flag}/--no-{flag}"] if is_bool else [f"--{flag}"]
        opt = typer.Option(*decls, help=text, rich_help_panel=o["group"], show_default=False,
                           metavar=o["metavar"] or ("" if is_bool else None))
        name = "_".join(path + (f.name,)).replace("-", "_")
        ann = Annotated[(list[kind] if is_list else kind) | None, opt]
        conv = (converters or {}).get(".".join(path + (f.name,)))
        out_.append((_Param(path + (f.name,), name, flag, kind, is_list, is_bool, conv),
                     inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=ann)))
        for i, old in enumerate(x for x in o.get("old", ()) if x.startswith("--")):  # former flags, hidden
            old_decl = [f"{old}/--no-{old[2:]}"] if is_bool else [old]
            old_opt = typer.Option(*old_decl, hidden=True, show_default=False)
            old_name = f"{name}__old{i}"
            out_.append((_Param(path + (f.name,), old_name, old[2:], kind, is_list, is_bool, conv, old_of=flag),
                         inspect.Parameter(old_name, inspect.Parameter.KEYWORD_ONLY, default=None,
                                           annotation=Annotated[(list[kind] if is_list else kind) | None, old_opt])))
    return out_


def _nest(values: dict[tuple[str, ...], Any]) -> dict:
    root: dict = {}
    for path, v in values.items():
        d = root
        for p in path[:-1]:
            d = d.setdefault(p, {})
        d[path[-1]] = v
    return root


def stage_command(command: str, cls: type, *, section: str, panel: str = PIPELINE, converters: dict | None = None,
                  skip: set[str] = frozenset(), shared_loop_keys: tuple[str, ...] = ("model", "gguf_file", "seed", "device")):
    """Register ``fn(cfg, **own)`` as ``sgsd COMMAND`` with one option per field of ``cls``.

    ``converters``: field path -> function applied to the CLI string (e.g. ``--shard i/n``); ``skip``: fields
    that are not options of this command; ``shared_loop_keys``: keys a loop recipe's ``[loop]`` table gives
    every stage when ``--config`` names a loop recipe."""

    def deco(fn: Callable) -> Callable:
        first = next(iter(inspect.signature(fn).parameters))
        lazy = first == "make_cfg"  # fn(make_cfg, ...): the config is built only when fn asks for it
        own = [p for p in inspect.signature(fn).parameters.values() if p.name not in ("cfg", "make_cfg", "sections")]
        whole = first == "sections"  # fn(sections, source, ...): every table of a recipe (sgsd loop)
        if whole:
            own = [p for p in own if p.name not in ("source", "dry_run")]
        own_hints = typing.get_type_hints(fn, include_extras=True)
        own = [p.replace(annotation=own_hints.get(p.name, p.annotation), kind=inspect.Parameter.KEYWORD_ONLY) for p in own]
        fields = _params(cls, converters=converters, skip=set(skip))
        taken = {p.name for p in own}
        fields = [(fp, ip) for fp, ip in fields if ip.name not in taken]
        extra = [inspect.Parameter("config", inspect.Parameter.KEYWORD_ONLY, default=None, annotation=ConfigOpt),
                 inspect.Parameter("set_", inspect.Parameter.KEYWORD_ONLY, default=None, annotation=SetOpt),
                 inspect.Parameter("dry_run", inspect.Parameter.KEYWORD_ONLY, default=False, annotation=DryRunOpt)]

        @functools.wraps(fn)
        def command_fn(**kw):
            config, sets, dry = kw.pop("config"), kw.pop("set_") or [], kw.pop("dry_run")
            given = {}
            for fp, _ in sorted(fields, key=lambda x: x[0].old_of is None):  # a new flag wins over its old name
                v = kw.pop(fp.name)
                if v is None or (fp.is_list and v == []):
                    continue
                if fp.old_of:
                    deprecated(f"--{fp.flag}", f"--{fp.old_of}")
                given[fp.path] = fp.convert(v) if fp.convert else v
            stray = sorted(set(parse_sets(sets, section)) - {section})
            if stray and not whole:
                raise InputError("--set", f"sgsd {command} takes {section}.* overrides only (got {', '.join(s + '.*' for s in stray)})")
            sections, source = resolve(config, sets, {section: _nest(given)}, default_section=section)
            if whole:  # fn checks and prints the whole recipe itself on --dry-run (sgsd loop)
                return fn(sections, source, dry_run=dry, **kw)
            shared = {k: v for k, v in sections.get("loop", {}).items() if k in shared_loop_keys}
            names = {f.name for f in dataclasses.fields(cls)}
            values = {**{k: v for k, v in shared.items() if k in names}, **sections.get(section, {})}
            if lazy and not dry:
                return fn(lambda: build(cls, values, section, source), **kw)
            cfg = build(cls, values, section, source)
            if dry:  # as the stage will run it: presets and per-objective defaults filled in (eval, train)
                shown = cfg.resolved() if callable(getattr(cfg, "resolved", None)) else cfg
                out.print_json(json.dumps(to_jsonable(dataclasses.asdict(shown))))
                return None
            return fn(cfg, **kw)

        command_fn.__signature__ = inspect.Signature(own + [ip for _, ip in fields] + extra)
        command_fn.__annotations__ = {}
        app.command(command, rich_help_panel=panel)(cli_errors(command_fn))
        return fn

    return deco
