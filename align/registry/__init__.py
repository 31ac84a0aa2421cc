"""Step 1, the registry: align.toml -> frozen ModelSpecs. Never imports torch or paddle."""

from align.registry.load import find_registry, load_registry
from align.registry.spec import (
           ModelSpec,
           Registry,
           Tolerance,
           matches,
           require_matching,
           resolve_path,
           unmatched,
)

__all__ = ["ModelSpec", "Registry", "Tolerance", "find_registry", "load_registry", "matches", "require_matching",
           "resolve_path", "unmatched"]
