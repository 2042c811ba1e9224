"""Method options and sweep grids as the command line writes them: `NAME.KEY=VALUE` and `NAME.KEY=V1,V2,...`.

Values are literals: `true` / `false`, `none` / `null`, integers, decimals, Python literals in brackets or quotes
(`[100,800]`, `{0.08: 6, 1.0: 1}`, `"kmeans"`), anything else a bare string. In `--method-option`, a value with
top-level commas is a tuple (`pab.timestep_window=100,800`); in `--grid` those commas separate the values
(`teacache.delta=0.05,0.1`), so a tuple value goes in brackets. Only the syntax is checked here (no torch): which
keys a method accepts is `hetcache.methods.method_options`' business. A HetCache config file (`--config`) gives
the hetcache method's options underneath the command line's (`over_config`).
"""

from __future__ import annotations

import ast
from collections.abc import Iterable, Sequence
from typing import Any

from hetcache.errors import UserError

_WORDS = {"true": True, "false": False, "none": None, "null": None}
_OPEN, _CLOSE = "([{", ")]}"


def parse_value(text: str) -> Any:
    """One literal (see the module docstring)."""
    text = text.strip()
    if not text:
        raise UserError("an option value is empty: give one value per key (a tuple goes in brackets in --grid)")
    if text.lower() in _WORDS:
        return _WORDS[text.lower()]
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    if text[:1] in _OPEN + "'\"":
        try:
            return ast.literal_eval(text)
        except (ValueError, SyntaxError):
            raise UserError(f"cannot read the value {text!r}: use a number, true/false, none or a literal") from None
    return text


def split_top_level(text: str) -> list[str]:
    """`text` split at the commas outside brackets and quotes."""
    parts, depth, quote, start = [], 0, "", 0
    for i, char in enumerate(text):
        if quote:
            quote = "" if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char in _OPEN:
            depth += 1
        elif char in _CLOSE:
            depth -= 1
        elif char == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return parts


def _assignment(text: str, what: str, methods: Sequence[str]) -> tuple[str, str, str]:
    name, dot, rest = text.partition(".")
    key, equals, value = rest.partition("=")
    name, key = name.strip(), key.strip()
    if not (dot and equals and name and key and value.strip()):
        raise UserError(f"{what} {text!r} is not NAME.KEY=VALUE: e.g. teacache.delta=0.05")
    if name not in methods:
        raise UserError(f"{what} {text!r}: unknown method {name!r}: use one of {', '.join(methods)}")
    return name, key, value


def parse_method_options(texts: Iterable[str], methods: Sequence[str]) -> dict[str, dict[str, Any]]:
    """`--method-option` values ("NAME.KEY=VALUE") as {method: {key: value}}; a key given twice keeps the last."""
    options: dict[str, dict[str, Any]] = {}
    for text in texts:
        name, key, value = _assignment(text, "--method-option", methods)
        parts = split_top_level(value)
        options.setdefault(name, {})[key] = parse_value(value) if len(parts) == 1 else tuple(map(parse_value, parts))
    return options


def parse_grids(texts: Iterable[str], methods: Sequence[str]) -> dict[str, dict[str, list[Any]]]:
    """`--grid` values ("NAME.KEY=V1,V2,...") as {method: {key: [values]}}; several keys of one method are crossed
    by the sweep."""
    grids: dict[str, dict[str, list[Any]]] = {}
    for text in texts:
        name, key, value = _assignment(text, "--grid", methods)
        values = [parse_value(part) for part in split_top_level(value) if part.strip()]
        if not values:
            raise UserError(f"--grid {text!r} gives no value: e.g. teacache.delta=0.03,0.05,0.1")
        grids.setdefault(name, {})[key] = values
    return grids


def over_config(fields: dict[str, Any], options: dict[str, Any]) -> dict[str, Any]:
    """The hetcache method's options from a config file (`fields`, `--config`) with `options` (the command line's,
    or a sweep point's) over them. A config is planned one way, so options that decide the plan (`plan`, `budget`
    or `delta`) replace the file's way of deciding it."""
    # torch is loaded already: the file was read into a HetCacheConfig.
    from hetcache.config import PLAN_SOURCES

    if any(options.get(name) is not None for name in PLAN_SOURCES):
        fields = {key: value for key, value in fields.items() if key not in PLAN_SOURCES}
    return {**fields, **options}
