"""A tiny TOML writer, enough for the monitor's config files (tables, nested tables, arrays of
tables, strings, booleans, numbers, arrays of scalars). ``dumps(d)`` round-trips through
``tomllib.loads`` for those types; anything else raises TypeError."""
from __future__ import annotations

import json
import math
import re

_BARE = re.compile(r"^[A-Za-z0-9_-]+$")


def key(k) -> str:
    k = str(k)
    return k if _BARE.match(k) else json.dumps(k)


def scalar(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)  # JSON string escapes are valid TOML basic-string escapes
    if isinstance(v, (list, tuple)):
        if any(isinstance(x, dict) for x in v):
            raise TypeError("arrays of tables are only supported as table values")
        return "[" + ", ".join(scalar(x) for x in v) + "]"
    raise TypeError(f"cannot write {type(v).__name__} as TOML")


def _is_table_array(v) -> bool:
    return isinstance(v, (list, tuple)) and len(v) > 0 and all(isinstance(x, dict) for x in v)


def _emit(d: dict, path: list[str], out: list[str]) -> None:
    scalars = [(k, v) for k, v in d.items() if not isinstance(v, dict) and not _is_table_array(v)]
    for k, v in scalars:
        out.append(f"{key(k)} = {scalar(v)}")
    for k, v in d.items():
        if isinstance(v, dict):
            p = path + [key(k)]
            out.append("")
            out.append(f"[{'.'.join(p)}]")
            _emit(v, p, out)
        elif _is_table_array(v):
            p = path + [key(k)]
            for item in v:
                out.append("")
                out.append(f"[[{'.'.join(p)}]]")
                _emit(item, p, out)


def dumps(d: dict) -> str:
    out: list[str] = []
    _emit(d, [], out)
    return "\n".join(out).lstrip("\n") + "\n"
