"""`align convert`: PaConvert drafts a Paddle port from the reference's own source, align's
rules make the draft runnable, and the report says what was converted, what the rules
rewrote, and what still needs a human.

    the reference's module and the modules of its package it imports that run torch (sources.py)
      -> PaConvert, one file at a time (its own venv, a subprocess) -> drafts + logs
      -> rewrites (imports to the siblings, the runtime or the installed package; buffers,
         torch semantics) -> build/converted/<model>/, one generated package

The generated code is never committed: build/ is git-ignored. The sources are read from the
installed package, so the port always matches the code the reference runs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from align.atomic import scratch, write_folder
from align.convert.paconvert import ApiUse, paconvert_command, parse_log, run_paconvert
from align.convert.sources import follow
from align.convert.rewrite import Leftover, Rewrite, rewrite, runtime_names
from align.errors import ConfigError
from align.registry.spec import ModelSpec, PortVariant

REPORT_NAME = "conversion.json"
DRAFT_NAME = "paconvert_draft.py"  # PaConvert's own output, kept so that "draft line N" can be looked up
# Bumped whenever the rewrite rules change, so a stale generated port is noticed.
RULES_VERSION = 3


@dataclass(frozen=True)
class ConvertedModule:
    """One module of a conversion: where it came from, where it went, what PaConvert converted."""

    module: str
    file: str
    output: str  # relative to the registry's directory
    total_uses: int
    converted_uses: int

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class ConversionReport:
    model: str
    port: str
    reference_file: str
    reference_sha256: str  # of every source file converted, in order
    output: str  # the generated module, relative to the registry's directory
    paconvert_version: str
    rules_version: int
    converted: tuple[ApiUse, ...]
    unconverted: tuple[ApiUse, ...]
    rewrites: tuple[Rewrite, ...]
    leftovers: tuple[Leftover, ...]
    total_uses: int = 0
    converted_uses: int = 0
    package: str = ""  # the source's own package: transformers, auraloss, dac, ...
    modules: tuple[ConvertedModule, ...] = ()

    @property
    def rate(self) -> float:
        return self.converted_uses / self.total_uses if self.total_uses else 0.0

    def to_dict(self) -> dict:
        return {
            "model": self.model, "port": self.port, "reference_package": self.package,
            "reference_file": self.reference_file,
            "reference_sha256": self.reference_sha256, "output": self.output,
            "paconvert_version": self.paconvert_version, "rules_version": self.rules_version,
            "api_uses": {"total": self.total_uses, "converted": self.converted_uses, "rate": round(self.rate, 4)},
            "converted": [u.to_dict() for u in self.converted],
            "unconverted": [u.to_dict() for u in self.unconverted],
            "rewrites": [r.to_dict() for r in self.rewrites],
            "leftovers": [x.to_dict() for x in self.leftovers],
            "modules": [m.to_dict() for m in self.modules],
        }


# --- where things are -----------------------------------------------------------------------


def output_dir(spec: ModelSpec, variant: PortVariant) -> Path:
    return spec.root / "build" / variant.name / spec.name


def generated_module(spec: ModelSpec, variant: PortVariant) -> Path:
    return output_dir(spec, variant) / (variant.source.rpartition(".")[2] + ".py")


def import_name(spec: ModelSpec, variant: PortVariant) -> str:
    """The name the generated module is imported under (it lives outside any package)."""
    return f"align_{variant.name}.{spec.name}"


# --- PaConvert ----------------------------------------------------------------------------


# --- align's rewrite rules ------------------------------------------------------------------


# --- the command --------------------------------------------------------------------------

def convert(spec: ModelSpec, variant: PortVariant, exe: Path | None = None) -> ConversionReport:
    """Convert the reference's module and the torch modules of its package it imports (see
    sources.follow); write the generated package and conversion.json beside it."""
    key = f"models.{spec.name}.ports.{variant.name}.source"
    sources = follow(variant.source, spec.source, key)
    exe = exe or paconvert_command(spec.root)
    out = generated_module(spec, variant)
    files: dict[str, str] = {"__init__.py": "# The package of a generated port (see conversion.json).\n"}
    converted, unconverted, rewrites, leftovers, modules = [], [], [], [], []
    total = done = 0
    version = "unknown"
    for module in sources.modules:
        source = sources.files[module]
        with scratch("paconvert") as tmp:
            draft, log, version = run_paconvert(exe, source, Path(tmp))
        try:
            ok, missing, n_total, n_done = parse_log(log)
        except ValueError as e:
            raise ConfigError(source, "", str(e)) from None
        name = f"{sources.stem(module)}.py"
        header = (f"# GENERATED by `align convert {spec.name}` from {module} ({sources.package}, installed),\n"
                  f"# drafted by PaConvert {version} ({_draft_name(sources, module)}) and rewritten by align's rules "
                  f"(version {RULES_VERSION}).\n# Do not edit or commit: see {REPORT_NAME} beside it.\n")
        code, changed, left = rewrite(draft, module, runtime_names(), header, sources)
        # An import of another package's torch code stays: counted as a use not converted.
        imports = [ApiUse(f"import {x.imports}", 1, None, (x.line,)) for x in left if x.imports]
        files[name], files[_draft_name(sources, module)] = code, draft
        converted += [dataclasses.replace(u, file=name) for u in ok]
        unconverted += [dataclasses.replace(u, file=name) for u in missing + imports]
        rewrites += [dataclasses.replace(r, file=name) for r in changed]
        leftovers += [dataclasses.replace(x, file=name) for x in left]
        total, done = total + n_total + len(imports), done + n_done
        modules.append(ConvertedModule(module, str(source), str((out.parent / name).relative_to(spec.root)),
                                       n_total + len(imports), n_done))
    report = ConversionReport(
        model=spec.name, port=variant.name, reference_file=str(sources.files[variant.source]),
        reference_sha256=_sources_hash(sources), output=str(out.relative_to(spec.root)), paconvert_version=version,
        rules_version=RULES_VERSION, converted=tuple(converted), unconverted=tuple(unconverted),
        rewrites=tuple(rewrites), leftovers=tuple(leftovers), total_uses=total, converted_uses=done,
        package=sources.package, modules=tuple(modules))
    files[REPORT_NAME] = json.dumps(report.to_dict(), indent=2) + "\n"
    write_folder(out.parent, lambda tmp: [(tmp / n).write_text(text) for n, text in files.items()])
    return report


def _draft_name(sources: Any, module: str) -> str:
    """PaConvert's own output for a module, kept so that "draft line N" can be looked up."""
    return DRAFT_NAME if module == sources.modules[0] else f"paconvert_draft_{sources.stem(module)}.py"


def _sources_hash(sources: Any) -> str:
    digest = hashlib.sha256()
    for module in sources.modules:
        digest.update(sources.files[module].read_bytes())
    return digest.hexdigest()


def load_port(spec: ModelSpec, variant: PortVariant) -> ModelSpec:
    """The spec with the generated port in place of the hand port. Imports the generated module
    (from build/, outside any package) under `align_<port>.<model>`."""
    path = generated_module(spec, variant)
    hint = f"run `align convert {spec.name}` first"
    if not path.is_file():
        raise ConfigError(spec.source, f"models.{spec.name}.ports.{variant.name}",
                          f"no generated port at {path.relative_to(spec.root)}; {hint}")
    meta = json.loads((path.parent / REPORT_NAME).read_text())
    sources = follow(variant.source, spec.source, f"models.{spec.name}.ports.{variant.name}.source")
    if meta.get("reference_sha256") != _sources_hash(sources) or meta.get("rules_version") != RULES_VERSION:
        raise ConfigError(spec.source, f"models.{spec.name}.ports.{variant.name}",
                          f"{path.relative_to(spec.root)} was generated from another version of {variant.source} "
                          f"or of align's rules; {hint} again")
    name = import_name(spec, variant)
    # Executed afresh on every load: the files may have been regenerated (or, in a test, broken
    # on purpose) since the last one; a cached module would align stale code. The port's
    # module is a package over its folder, so its converted siblings import relatively.
    for stale in [m for m in sys.modules if m == name or m.startswith(name + ".")]:
        del sys.modules[stale]
    found = importlib.util.spec_from_file_location(name, path, submodule_search_locations=[str(path.parent)])
    module = importlib.util.module_from_spec(found)
    sys.modules[name] = module  # builders.import_object finds the port class by this name
    try:
        found.loader.exec_module(module)
    except Exception as e:  # the generated code is not ours to trust: say where it broke
        sys.modules.pop(name, None)
        raise ConfigError(path, "", f"the generated port does not import: {type(e).__name__}: {e}") from None
    return dataclasses.replace(
        spec, port_class=f"{name}:{variant.class_name}", port_config_class=variant.config_class,
        weights_file=variant.weights_file, port_call_kwargs=variant.call_kwargs, port_labels=variant.labels,
        port_environment=None)


def render(report: ConversionReport) -> str:
    """The console summary of a conversion."""
    out = [f"{report.model}: {report.reference_file} ({report.package})",
           f"  PaConvert {report.paconvert_version}: {report.converted_uses}/{report.total_uses} torch API uses "
           f"converted ({100 * report.rate:.1f}%)"]
    for u in report.unconverted:
        out.append(f"  not converted: {u.name} x{u.count} (reference lines {', '.join(map(str, u.lines))})")
    by_rule: dict[str, int] = {}
    for r in report.rewrites:
        by_rule[r.rule] = by_rule.get(r.rule, 0) + 1
    out.append(f"  rewritten by align's rules: {len(report.rewrites)} lines "
               f"({', '.join(f'{k} {v}' for k, v in sorted(by_rule.items())) or 'none'})")
    for m in report.modules[1:]:
        out.append(f"  converted with it: {m.module} -> {Path(m.output).name} ({m.converted_uses}/{m.total_uses})")
    for r in report.rewrites:
        if not r.rule.startswith("import-"):
            out.append(f"    draft line {r.line} ({r.rule}): {r.before.splitlines()[0][:90]}")
    out.append(f"  left for a human: {len(report.leftovers)}")
    for x in report.leftovers:
        out.append(f"    line {x.line}: {x.text[:80]} -- {x.why}")
    out.append(f"  wrote {report.output} and {Path(report.output).parent / REPORT_NAME}")
    return "\n".join(out)
