"""``ldm-train config show|keys``: the resolved config, and every key with its type, default and doc.

The docs are the schema's own: each field's ``Field(description=...)`` in :mod:`ldm_train.config`
(sections: their class docstring's first line); ``eval.samplers.NAME.*`` come from the sampler
registry (:func:`ldm_train.diffusion.samplers.settings_model`). The README's configuration table
is checked against the same listing (``tests/test_config_doc.py``).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import types
import typing
from dataclasses import dataclass
from typing import Any, Iterator

from pydantic import BaseModel

from .config import Config, ConfigError, _is_section, config_yaml, dotted_fields, load_config
from .errors import UserError


@dataclass(frozen=True)
class Key:
    """One config key: ``name`` dotted from the top (``diffusion.loss.weighting``)."""

    name: str
    type: str
    default: Any
    doc: str


def type_name(annotation: Any) -> str:
    """A short, YAML-minded spelling of a field's type: ``int``, ``float | null``, ``"a" | "b"``."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Literal:
        return " | ".join(json.dumps(a) for a in args)
    if origin is typing.Annotated:
        return type_name(args[0]) + bounds([m for a in args[1:] for m in getattr(a, "metadata", [a])])
    if origin in (typing.Union, types.UnionType):
        return " | ".join(type_name(a) for a in args)
    if annotation is type(None):
        return "null"
    if origin in (list, dict, tuple):
        return f"{origin.__name__}[{', '.join(type_name(a) for a in args)}]"
    if annotation is Any:
        return "any"
    return getattr(annotation, "__name__", str(annotation).replace("typing.", ""))


_BOUNDS = {"gt": ">", "ge": ">=", "lt": "<", "le": "<=", "min_length": "len >="}


def bounds(metadata: list) -> str:
    """`` (> 0, < 1)`` from a field's constraints (``Field(gt=0, lt=1)``), or empty."""
    parts = [f"{sym} {getattr(m, name)}" for m in metadata for name, sym in _BOUNDS.items()
             if getattr(m, name, None) is not None]
    return f" ({', '.join(parts)})" if parts else ""


def section_doc(model: type[BaseModel]) -> str:
    """The first line of a section's docstring (its one-line doc)."""
    doc = (model.__doc__ or "").strip()
    return " ".join(doc.split("\n\n")[0].split()).split(". ")[0].rstrip(".") if doc else ""


def _plain(value: Any) -> Any:
    return value.model_dump() if isinstance(value, BaseModel) else value


def iter_keys(samplers: bool = True) -> Iterator[Key]:
    """Every leaf key of :class:`Config` (nested sections included); in place of ``eval.samplers``
    each sampler's own settings, ``eval.samplers.NAME.KEY`` (when ``samplers``; imports torch)."""
    for dotted, field in dotted_fields():
        if dotted == "eval.samplers" and samplers:
            yield from sampler_keys()
            continue
        yield Key(dotted, type_name(field.annotation) + bounds(field.metadata),
                  _plain(field.get_default(call_default_factory=True)), field.description or "")


def sampler_keys() -> Iterator[Key]:
    """``eval.samplers.NAME.KEY`` for every registered sampler's keyword-only settings."""
    import inspect

    from .diffusion.samplers import SAMPLERS, settings_model

    for sampler, entry in SAMPLERS.items():
        for name, field in settings_model(sampler).model_fields.items():
            fn = entry.grid if name in inspect.signature(entry.grid).parameters else entry.fn
            doc = field.description or f"eval.sampler={sampler}: keyword of {fn.__module__}.{fn.__qualname__}"
            yield Key(f"eval.samplers.{sampler}.{name}", type_name(field.annotation) + bounds(field.metadata),
                      field.get_default(), doc)


def sections(model: type[BaseModel] = Config, prefix: str = "") -> dict[str, str]:
    """{dotted section: one-line doc} for every section and nested section."""
    out: dict[str, str] = {}
    for name, field in model.model_fields.items():
        if _is_section(field.annotation):
            out[prefix + name] = section_doc(field.annotation)
            out.update(sections(field.annotation, f"{prefix}{name}."))
    return out


def _default_text(value: Any) -> str:
    return json.dumps(value, default=str)


def format_keys(keys: list[Key]) -> str:
    if not keys:
        return ""
    width = max(len(k.name) for k in keys)
    twidth = min(max(len(k.type) for k in keys), 40)
    lines = []
    for k in keys:
        lines.append(f"{k.name:<{width}}  {k.type:<{twidth}}  = {_default_text(k.default)}")
        if k.doc:
            lines.append(f"{'':<{width}}    {k.doc}")
    return "\n".join(lines)


def add_config_parser(sub: argparse._SubParsersAction, common) -> None:
    """``config show`` (takes ``common``'s --config and overrides) and ``config keys [SECTION]``."""
    p = sub.add_parser("config", help="print the resolved config, or list every key with its type, default and doc")
    csub = p.add_subparsers(dest="config_command", required=True, metavar="ACTION")
    show = csub.add_parser("show", help="the resolved config as YAML (what a stage writes to {run}/config.yaml)")
    common(show)
    keys = csub.add_parser("keys", help="every key (dotted), its type, default and one-line doc")
    keys.add_argument("section", nargs="?", default=None, help="only keys under this section, e.g. diffusion or eval.metrics")


def run_config(args: argparse.Namespace) -> int:
    """Run ``config show|keys``; errors are printed (exit 2), like every other subcommand."""
    try:
        if args.config_command == "show":
            path = getattr(args, "config", None)
            cfg = load_config(path, getattr(args, "overrides", ()))
            from .diffusion.checks import check_config  # what a stage refuses is not shown as a config

            check_config(cfg, str(path or "<defaults>") + " + overrides")
            sys.stdout.write(config_yaml(cfg))
            return 0
        keys = list(iter_keys())
        if args.section:
            section = args.section.strip(".")
            keys = [k for k in keys if k.name == section or k.name.startswith(section + ".")]
            if not keys:
                known = ", ".join(sections())
                raise ConfigError(f"no section or key {section!r}; sections: {known}")
        try:
            print(format_keys(keys))
        except BrokenPipeError:  # `ldm-train config keys | head`
            sys.stdout = open(os.devnull, "w")
        return 0
    except UserError as e:
        print(f"ldm-train config: error: {e}", file=sys.stderr)
        return 2
