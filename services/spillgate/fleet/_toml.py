"""A minimal TOML writer for the plain data the fleet generates (stdlib only reads TOML).

Handles str, bool, int, float, lists and dicts: top-level dicts of dicts become `[a.b]`
tables, top-level lists of dicts become `[[name]]` arrays, everything deeper is inline.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from typing import Any

_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")


def _key(key: str) -> str:
    return key if _BARE_KEY.match(key) else json.dumps(key)


def value(v: Any) -> str:
    """One TOML value (inline form)."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if not math.isfinite(v):
            return "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf")
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)  # JSON string escapes are valid TOML basic-string escapes
    if isinstance(v, list | tuple):
        return "[" + ", ".join(value(x) for x in v) + "]"
    if isinstance(v, Mapping):
        return "{ " + ", ".join(f"{_key(k)} = {value(x)}" for k, x in v.items()) + " }"
    raise TypeError(f"cannot write {type(v).__name__} as TOML")


def dumps(doc: Mapping[str, Any]) -> str:
    """A document: scalars first, then `[table]`s and `[[array]]`s in insertion order."""
    lines: list[str] = []
    tables: list[str] = []
    for k, v in doc.items():
        if isinstance(v, list) and v and all(isinstance(x, Mapping) for x in v):
            for item in v:
                tables += ["", f"[[{_key(k)}]]"]
                tables += [f"{_key(ik)} = {value(iv)}" for ik, iv in item.items()]
        elif isinstance(v, Mapping) and v and all(isinstance(x, Mapping) for x in v.values()):
            for sub, body in v.items():
                tables += ["", f"[{_key(k)}.{_key(sub)}]"]
                tables += [f"{_key(ik)} = {value(iv)}" for ik, iv in body.items()]
        else:
            lines.append(f"{_key(k)} = {value(v)}")
    return "\n".join(lines + tables) + "\n"
