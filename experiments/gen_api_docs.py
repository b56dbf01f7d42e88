"""Write docs/api.md from the library's docstrings (plain mkdocs cannot render docstrings itself).

    python experiments/gen_api_docs.py            # rewrite docs/api.md
    python experiments/gen_api_docs.py --check    # exit 1 when docs/api.md is out of date

Every public name (a module's ``__all__``) gets its signature and its docstring, verbatim.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODULES = [  # documented in this order; modules that do not import (yet) are listed as missing
    "sde.sdes", "sde.flow", "sde.oracle", "sde.samplers", "sde.samplers.learned_grid", "sde.likelihood", "sde.nets",
    "sde.models", "sde.losses", "sde.data", "sde.training", "sde.checkpoint", "sde.distributed_eval", "sde.metrics",
    "sde.features", "sde.guidance", "sde.inverse", "sde.smc", "sde.editing", "sde.pretrained",
]


def _signature(obj) -> str:
    try:
        return str(inspect.signature(obj))
    except (TypeError, ValueError):
        return ""


def _entry(name: str, obj) -> list[str]:
    kind = "class" if inspect.isclass(obj) else "def" if callable(obj) else "data"
    head = f"{kind} {name}{_signature(obj)}" if kind != "data" else f"{name}: {type(obj).__name__}"
    if kind == "data" and isinstance(obj, dict):
        head += " = {" + ", ".join(repr(k) for k in obj) + "}"
    lines = [f"### `{name}`", "", "```python", head, "```", ""]
    doc = inspect.getdoc(obj) if kind != "data" else None
    if doc:
        lines += ["```text", doc, "```", ""]
    if inspect.isclass(obj):
        for meth, member in inspect.getmembers(obj):
            if meth.startswith("_") or meth not in obj.__dict__ or not callable(member):
                continue
            mdoc = (inspect.getdoc(member) or "").split("\n\n")[0]
            lines.append(f"- `{meth}{_signature(member)}`" + (f": {mdoc}" if mdoc else ""))
        lines.append("")
    return lines


def render() -> str:
    sys.path.insert(0, str(ROOT))
    out = ["# API reference", "",
           "Generated from the docstrings by `python experiments/gen_api_docs.py`; do not edit by hand.", ""]
    for modname in MODULES:
        try:
            mod = importlib.import_module(modname)
        except ImportError as err:
            out += [f"## `{modname}`", "", f"(not importable: {err})", ""]
            continue
        out += [f"## `{modname}`", ""]
        summary = (inspect.getdoc(mod) or "").split("\n\n")[0]
        if summary:
            out += [summary.replace("\n", " "), ""]
        for name in getattr(mod, "__all__", []):
            if hasattr(mod, name):
                out += _entry(name, getattr(mod, name))
    return "\n".join(out).rstrip() + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true", help="fail if docs/api.md differs from the docstrings")
    args = parser.parse_args()
    text, path = render(), ROOT / "docs" / "api.md"
    if args.check:
        current = path.read_text() if path.exists() else ""
        if current != text:
            print(f"{path} is out of date: run python experiments/gen_api_docs.py", file=sys.stderr)
            return 1
        return 0
    tmp = path.with_name(".api.md.tmp")
    tmp.write_text(text)
    tmp.replace(path)
    print(f"wrote {path} ({len(text.splitlines())} lines)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
