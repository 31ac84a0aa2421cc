"""What a conversion converts: the reference's module, and the modules of its own package it
imports that run torch code (its own nn layers, losses, utilities), followed from import to
import; found from their source, never by importing them.

Each import of the source package is then one of:
- converted with it (a sibling in the generated package): package code that uses torch;
- the package's runtime: a Paddle stand-in for shared infrastructure, where align has one
  (transformers: align.convert.hf_runtime covers everything outside the model's own folder);
- the installed module itself: package code that never touches torch (a configuration
  class), which the port can use as it is.
"""

from __future__ import annotations

import ast
import importlib.util
from dataclasses import dataclass, field
from pathlib import Path

from align.errors import ConfigError

# Source packages whose shared infrastructure has a Paddle stand-in.
RUNTIMES = {"transformers": "align.convert.hf_runtime"}


def module_file(module: str, file: Path, key: str) -> Path:
    """The .py file of an installed module (or package's __init__), found without importing it
    (importing a modeling file would import torch)."""
    top, _, rest = module.partition(".")
    found = importlib.util.find_spec(top)
    if found is None or not found.submodule_search_locations:
        raise ConfigError(file, key, f"no installed package {top!r}")
    base = Path(list(found.submodule_search_locations)[0]).joinpath(*rest.split(".")) if rest else \
        Path(list(found.submodule_search_locations)[0])
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    raise ConfigError(file, key, f"{module!r} is not a module of the installed {top} ({base}.py does not exist)")


def find_module(module: str) -> Path | None:
    """The file of an installed module, or None."""
    try:
        return module_file(module, Path("."), "")
    except ConfigError:
        return None


def imported_module(module: str, is_package: bool, level: int, name: str | None) -> str:
    """The absolute module `from {'.' * level}{name} import ...` names inside `module` (a
    package's __init__ when `is_package`: its `.` is itself, a module's is its parent)."""
    if not level:
        return name or ""
    own = module if is_package else module.rpartition(".")[0]
    base = own.rsplit(".", level - 1)[0] if level > 1 else own
    return f"{base}.{name}" if name else base


def _imported(module: str, path: Path) -> list[str]:
    """Every module a file imports from (`from X import y` where X.y is itself a module counts as X.y)."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            target = imported_module(module, path.name == "__init__.py", node.level, node.module)
            for a in node.names:
                sub = f"{target}.{a.name}"
                out.append(sub if find_module(sub) else target)
        elif isinstance(node, ast.Import):
            out.extend(a.name for a in node.names)
    return out


def uses_torch(path: Path) -> bool:
    """Whether a file imports torch (anywhere in it)."""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import) and any(a.name.split(".")[0] == "torch" for a in node.names):
            return True
        if isinstance(node, ast.ImportFrom) and not node.level and (node.module or "").split(".")[0] == "torch":
            return True
    return False


@dataclass(frozen=True)
class Sources:
    """The modules one conversion converts (the reference's first) and how each import of the
    source package is to be rewritten."""

    package: str  # the source's top-level package: "transformers", "auraloss", "dac"
    modules: tuple[str, ...]
    files: dict[str, Path] = field(default_factory=dict)
    runtime: str | None = None
    scope: str = ""  # with a runtime: the model's own folder; what lies outside is the runtime's

    def stem(self, module: str) -> str:
        """The generated file's name (without .py) for a converted module: its path inside the
        package, the first (the reference's module) by its last name."""
        if module == self.modules[0]:
            return module.rpartition(".")[2]
        parts = module.split(".")[1:]
        return "_".join(parts) or "init"

    def kind(self, imported: str) -> str:
        """"converted", "runtime", "installed", or "other" (another package) for an imported module."""
        if imported.split(".")[0] != self.package:
            return "other"
        if imported in self.modules:
            return "converted"
        if self.runtime and not (imported == self.scope or imported.startswith(self.scope + ".")):
            return "runtime"
        return "installed"


def follow(source: str, file: Path, key: str) -> Sources:
    """The reference's module and, breadth first, every module of its package it imports that
    runs torch code (outside a runtime's territory)."""
    package = source.split(".")[0]
    runtime = RUNTIMES.get(package)
    scope = source.rpartition(".")[0]
    files = {source: module_file(source, file, key)}
    queue = [source]
    while queue:
        module = queue.pop(0)
        for imported in _imported(module, files[module]):
            if imported.split(".")[0] != package or imported in files:
                continue
            if runtime and not (imported == scope or imported.startswith(scope + ".")):
                continue
            path = find_module(imported)
            if path is None or not uses_torch(path):
                continue
            files[imported] = path
            queue.append(imported)
    return Sources(package, tuple(files), files, runtime, scope)
