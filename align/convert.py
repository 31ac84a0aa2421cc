"""`align convert`: PaConvert drafts a Paddle port from the reference's own modeling file, this
module's rules make the draft runnable against align's runtime, and the report says what was
converted, what the rules rewrote, and what still needs a human.

    installed transformers file -> PaConvert (its own venv, a subprocess) -> draft + log
      -> rewrites (imports to align.hf_runtime, buffers, torch semantics) -> build/converted/<model>/

The generated code is never committed: build/ is git-ignored. The reference file is read from
the installed package, so the port always matches the transformers the reference runs.
"""

from __future__ import annotations

import ast
import dataclasses
import hashlib
import importlib.util
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import tokenize
from dataclasses import dataclass
from pathlib import Path

from align.spec import ConfigError, ModelSpec, PortVariant

RUNTIME = "align.hf_runtime"
REPORT_NAME = "conversion.json"
DRAFT_NAME = "paconvert_draft.py"  # PaConvert's own output, kept so that "draft line N" can be looked up
# Bumped whenever the rewrite rules change, so a stale generated port is noticed.
RULES_VERSION = 1
PACONVERT_VENV = ".venv-paconvert"


@dataclass(frozen=True)
class ApiUse:
    """One torch API, how often the reference uses it, and what PaConvert made of it."""

    name: str
    count: int
    paddle: str | None  # None: not converted
    lines: tuple[int, ...] = ()  # in the reference file

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class Rewrite:
    """A change align's rules made to PaConvert's draft (line numbers are the draft's)."""

    rule: str
    line: int
    before: str
    after: str
    why: str

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class Leftover:
    """Something neither PaConvert nor align's rules handled: a human must look."""

    line: int  # in the generated file
    text: str
    why: str

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class ConversionReport:
    model: str
    port: str
    reference_file: str
    reference_sha256: str
    output: str  # the generated module, relative to the registry's directory
    paconvert_version: str
    rules_version: int
    converted: tuple[ApiUse, ...]
    unconverted: tuple[ApiUse, ...]
    rewrites: tuple[Rewrite, ...]
    leftovers: tuple[Leftover, ...]
    total_uses: int = 0
    converted_uses: int = 0

    @property
    def rate(self) -> float:
        return self.converted_uses / self.total_uses if self.total_uses else 0.0

    def to_dict(self) -> dict:
        return {
            "model": self.model, "port": self.port, "reference_file": self.reference_file,
            "reference_sha256": self.reference_sha256, "output": self.output,
            "paconvert_version": self.paconvert_version, "rules_version": self.rules_version,
            "api_uses": {"total": self.total_uses, "converted": self.converted_uses, "rate": round(self.rate, 4)},
            "converted": [u.to_dict() for u in self.converted],
            "unconverted": [u.to_dict() for u in self.unconverted],
            "rewrites": [r.to_dict() for r in self.rewrites],
            "leftovers": [x.to_dict() for x in self.leftovers],
        }


# --- where things are -----------------------------------------------------------------------

def module_file(module: str, file: Path, key: str) -> Path:
    """The .py file of an installed module, found without importing it (importing
    transformers' modeling files would import torch)."""
    top, _, rest = module.partition(".")
    found = importlib.util.find_spec(top)
    if found is None or not found.submodule_search_locations:
        raise ConfigError(file, key, f"no installed package {top!r}")
    path = Path(list(found.submodule_search_locations)[0]).joinpath(*rest.split(".")).with_suffix(".py")
    if not path.is_file():
        raise ConfigError(file, key, f"{module!r} is not a module of the installed {top} ({path} does not exist)")
    return path


def output_dir(spec: ModelSpec, variant: PortVariant) -> Path:
    return spec.root / "build" / variant.name / spec.name


def generated_module(spec: ModelSpec, variant: PortVariant) -> Path:
    return output_dir(spec, variant) / (variant.source.rpartition(".")[2] + ".py")


def import_name(spec: ModelSpec, variant: PortVariant) -> str:
    """The name the generated module is imported under (it lives outside any package)."""
    return f"align_{variant.name}.{spec.name}"


def port_variant_of(port_class: str) -> str | None:
    """The variant a report's `port` ("align_converted.gemma2:Gemma2ForCausalLM") names; None
    for a hand port."""
    module = port_class.partition(":")[0]
    head, dot, _ = module.partition(".")
    return head[len("align_"):] if dot and head.startswith("align_") else None


# --- PaConvert ----------------------------------------------------------------------------

def paconvert_command(root: Path) -> Path:
    exe = root / PACONVERT_VENV / "bin" / "paconvert"
    if not exe.is_file():
        raise ConfigError(root / PACONVERT_VENV, "", "PaConvert is not installed here; create it with "
                                                     "`make venv-paconvert`")
    return exe


def run_paconvert(exe: Path, source: Path, workdir: Path) -> tuple[str, str, str]:
    """(draft, log, version): PaConvert on one file, in its own environment."""
    src = workdir / source.name
    shutil.copyfile(source, src)
    out, log = workdir / "draft.py", workdir / "paconvert.log"
    # In the work directory: --show_all_api also drops a spreadsheet into the current directory.
    proc = subprocess.run([str(exe), "-i", str(src), "-o", str(out), "--log_dir", str(log), "--show_all_api"],
                          capture_output=True, text=True, cwd=workdir)
    if proc.returncode != 0 or not out.is_file() or not log.is_file():
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        raise ConfigError(source, "", f"PaConvert failed (exit code {proc.returncode}): {tail[0]}")
    version = subprocess.run([str(exe), "--version"], capture_output=True, text=True, cwd=workdir).stdout.strip()
    return out.read_text(), log.read_text(), version.split()[-1].lstrip("v") if version else "unknown"


_USE = re.compile(r"^\[[^:\]]+:(\d+)\] \[(Success|Not Support)\] (?:Convert|convert) (?:Class Method: |Class Attribute: )?"
                  r"(\S+) to Paddle")
_ALL = re.compile(r"^(torch\S*)\s+(paddle\S*)\s+(\d+)\s*$")
_TOTAL = re.compile(r"There are (\d+) Pytorch APIs")
_DONE = re.compile(r"^\s*(\d+)\s+Pytorch APIs have been converted")


def parse_log(log: str) -> tuple[list[ApiUse], list[ApiUse], int, int]:
    """(converted, unconverted, total, converted count) from PaConvert's log. The per-use
    lines give names and lines; the summary gives totals, which must agree with them."""
    uses: dict[tuple[str, bool], list[int]] = {}
    for line in log.splitlines():
        if m := _USE.match(line):
            uses.setdefault((m.group(3), m.group(2) == "Success"), []).append(int(m.group(1)))
    targets = {m.group(1): m.group(2) for line in log.splitlines() if (m := _ALL.match(line))}
    total = int(m.group(1)) if (m := _TOTAL.search(log)) else None
    done = next((int(m.group(1)) for line in log.splitlines() if (m := _DONE.match(line))), None)
    converted = sorted((ApiUse(n, len(ls), targets.get(n, "?"), tuple(sorted(set(ls))))
                        for (n, ok), ls in uses.items() if ok), key=lambda u: (-u.count, u.name))
    unconverted = sorted((ApiUse(n, len(ls), None, tuple(sorted(set(ls))))
                          for (n, ok), ls in uses.items() if not ok), key=lambda u: (-u.count, u.name))
    counted = sum(u.count for u in converted), sum(u.count for u in unconverted)
    if total is None or done is None or (done, total - done) != counted:
        raise ValueError(f"PaConvert's log does not add up: summary {done}/{total}, per-use lines "
                         f"{counted[0]} converted + {counted[1]} not (has its log format changed?)")
    return converted, unconverted, total, done


# --- align's rewrite rules ------------------------------------------------------------------

def runtime_names(root: Path | None = None) -> set[str]:
    """Names align.hf_runtime exports, read from its source (no paddle import needed)."""
    init = (root or Path(__file__).parent) / "hf_runtime" / "__init__.py"
    names = set()
    for node in ast.parse(init.read_text()).body:
        if isinstance(node, ast.ImportFrom):
            names.update(a.asname or a.name for a in node.names)
    return names


def _indent(line: str) -> str:
    return line[: len(line) - len(line.lstrip())]


def _buffer_call(node: ast.AST) -> ast.Call | None:
    """torch.nn.Buffer(...) / nn.Buffer(...), the API PaConvert leaves unconverted."""
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "Buffer":
        return node
    return None


def _persistent(call: ast.Call, src: str) -> str:
    kw = next((k for k in call.keywords if k.arg == "persistent"), None)
    return ast.get_source_segment(src, kw.value) if kw else "True"


def _statement_rewrite(node: ast.stmt, src: str, reference_package: str, known: set[str],
                       leftovers: list[Leftover]) -> tuple[str, str, str] | None:
    """(rule, new statement, why) for a statement a rule applies to, else None."""
    seg = lambda n: ast.get_source_segment(src, n)  # noqa: E731
    if isinstance(node, ast.ImportFrom) and node.level:
        names = ", ".join(a.name + (f" as {a.asname}" if a.asname else "") for a in node.names)
        if node.level >= 3:
            for a in node.names:
                if a.name not in known:
                    leftovers.append(Leftover(node.lineno, f"{a.name} (from {'.' * node.level}{node.module or ''})",
                                              f"align's runtime ({RUNTIME}) has no {a.name!r}"))
            return ("import-runtime", f"from {RUNTIME} import {names}",
                    "transformers' torch infrastructure is replaced by align's Paddle runtime")
        parent = reference_package.rsplit(".", node.level - 1)[0] if node.level > 1 else reference_package
        module = f"{parent}.{node.module}" if node.module else parent
        return ("import-transformers", f"from {module} import {names}",
                "configuration classes are plain Python: the installed transformers' own are reused")
    if isinstance(node, ast.Assign) and len(node.targets) == 1 and (call := _buffer_call(node.value)):
        target = node.targets[0]
        if isinstance(target, ast.Attribute) and isinstance(target.value, ast.Name):
            return ("buffer", f'{target.value.id}.register_buffer("{target.attr}", {seg(call.args[0])}, '
                              f"persistable={_persistent(call, src)})",
                    "torch.nn.Buffer has no Paddle counterpart; a registered buffer is the same state")
    if (isinstance(node, ast.Expr) and isinstance(node.value, ast.Call) and isinstance(node.value.func, ast.Name)
            and node.value.func.id == "setattr" and len(node.value.args) == 3):
        obj, name, value = node.value.args
        if call := _buffer_call(value):
            return ("buffer", f"{seg(obj)}.register_buffer({seg(name)}, {seg(call.args[0])}, "
                              f"persistable={_persistent(call, src)})",
                    "torch.nn.Buffer has no Paddle counterpart; a registered buffer is the same state")
        if seg(obj) == "paddle.Tensor":
            return ("no-global-patch", f"pass  # align: PaConvert's setattr(paddle.Tensor, {seg(name)}, ...) removed",
                    "PaConvert patches paddle.Tensor for the whole process; the calls that needed it are "
                    "listed for a human instead")
    return None


# Text rules: (name, pattern, replacement, why). Applied after the statement rules.
TEXT_RULES = (
    ("embedding", r"\bpaddle\.nn\.Embedding\b", "hf_runtime.Embedding",
     "paddle's padding_idx zeroes the pad row's output (torch only withholds its gradient), and "
     "paddle's Embedding lacks torch's num_embeddings/embedding_dim/padding_idx"),
    ("cross-entropy", r"\bpaddle\.nn\.functional\.cross_entropy\b", "hf_runtime.cross_entropy",
     "paddle's mean with ignore_index=-100 divides by ALL tokens; torch by the non-ignored ones"),
    ("cross-entropy", r"\bpaddle\.nn\.CrossEntropyLoss\b", "hf_runtime.CrossEntropyLoss",
     "paddle's mean with ignore_index=-100 divides by ALL tokens; torch by the non-ignored ones"),
    ("conv-names", r"\bpaddle\.nn\.Conv([12])D\b", r"hf_runtime.Conv\1d",
     "HF code reads torch's conv attributes (stride, padding, dilation), which paddle keeps private"),
    ("jit-tracing", r"\btorch\.jit\.is_tracing\(\)", "False",
     "Paddle code is never traced by torch.jit"),
)


def _code_names(text: str) -> list[tuple[int, str]]:
    """(line, name) of every NAME token, skipping strings and comments."""
    try:
        return [(t.start[0], t.string) for t in tokenize.generate_tokens(io.StringIO(text).readline)
                if t.type == tokenize.NAME]
    except (tokenize.TokenError, SyntaxError):
        return []


_PATCHED_METHOD = re.compile(r'setattr\(paddle\.Tensor,\s*"(\w+)"')


def rewrite(draft: str, reference_module: str, known: set[str], header: str = "") -> tuple[str, list[Rewrite], list[Leftover]]:
    """Apply align's rules to PaConvert's draft; returns the code (starting with `header`),
    what changed (at the draft's line numbers) and what is left (at the code's)."""
    lines = draft.splitlines()
    rewrites: list[Rewrite] = []
    leftovers: list[Leftover] = []
    # PaConvert marks each line it could not convert with ">>>>>>"; unmarked, it is Python again.
    for i, line in enumerate(lines):
        if line.startswith(">>>>>>"):
            lines[i] = line[len(">>>>>>"):]
    # Text rules first: they keep every line where it is, so both kinds of rule report draft lines.
    for i, line in enumerate(lines):
        for name, pattern, repl, why in TEXT_RULES:
            new = re.sub(pattern, repl, line)
            if new != line:
                rewrites.append(Rewrite(name, i + 1, line.strip(), new.strip(), why))
                line = lines[i] = new
    src = "\n".join(lines) + "\n"
    patched = _PATCHED_METHOD.findall(src)
    package = reference_module.rpartition(".")[0]
    edits = []
    for node in ast.walk(ast.parse(src)):
        if isinstance(node, ast.stmt) and (found := _statement_rewrite(node, src, package, known, leftovers)):
            rule, new, why = found
            edits.append((node.lineno, node.end_lineno, rule, new, why))
    for start, end, rule, new, why in sorted(edits, reverse=True):
        before = "\n".join(lines[start - 1:end])
        lines[start - 1:end] = [_indent(lines[start - 1]) + new]
        rewrites.append(Rewrite(rule, start, before.strip(), new, why))
    rewrites.sort(key=lambda r: r.line)
    # The runtime is imported once, after PaConvert's `import paddle`.
    at = next((i for i, line in enumerate(lines) if line.strip() == "import paddle"), -1)
    lines.insert(at + 1, f"from align import hf_runtime  # added by align convert ({RUNTIME})")
    lines = header.splitlines() + lines
    text = "\n".join(lines) + "\n"
    for lineno, name in _code_names(text):
        if name == "torch":
            leftovers.append(Leftover(lineno, lines[lineno - 1].strip(), "still names torch"))
    for method in patched:
        for i, line in enumerate(lines):
            if re.search(rf"(?<!paddle)\.{method}\(", line) and "def " not in line and "setattr" not in line:
                leftovers.append(Leftover(i + 1, line.strip(), f"calls .{method}(), which PaConvert redefined on "
                                                              "paddle.Tensor for the whole process; check the "
                                                              "call's meaning by hand"))
    try:
        ast.parse(text)
    except SyntaxError as e:
        leftovers.append(Leftover(e.lineno or 0, (e.text or "").strip(), f"the generated code does not parse: {e.msg}"))
    # Import leftovers were found at draft lines; the rest at the code's. Report all at the code's.
    leftovers = [x if "align's runtime" not in x.why else dataclasses.replace(x, line=_code_line(lines, x.text))
                 for x in leftovers]
    leftovers.sort(key=lambda x: x.line)
    return text, rewrites, leftovers


def _code_line(lines: list[str], text: str) -> int:
    """The line of the generated code that imports the name a leftover is about."""
    name = text.split()[0]
    return next((i + 1 for i, line in enumerate(lines) if line.startswith(f"from {RUNTIME} import")
                 and re.search(rf"\b{name}\b", line)), 0)


# --- the command --------------------------------------------------------------------------

def _write_dir_atomic(target: Path, files: dict[str, str]) -> None:
    """Write files into a fresh sibling directory, then swap it in."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        for name, text in files.items():
            (tmp / name).write_text(text)
        if target.exists():
            old = target.with_name(f".{target.name}-old-{os.getpid()}")
            target.rename(old)
            tmp.rename(target)
            shutil.rmtree(old)
        else:
            tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def convert(spec: ModelSpec, variant: PortVariant, exe: Path | None = None) -> ConversionReport:
    """Convert the reference's modeling file; write the port and conversion.json."""
    key = f"models.{spec.name}.ports.{variant.name}.source"
    source = module_file(variant.source, spec.source, key)
    exe = exe or paconvert_command(spec.root)
    with tempfile.TemporaryDirectory(prefix="align-paconvert-") as tmp:
        draft, log, version = run_paconvert(exe, source, Path(tmp))
    try:
        converted, unconverted, total, done = parse_log(log)
    except ValueError as e:
        raise ConfigError(source, "", str(e)) from None
    out = generated_module(spec, variant)
    header = (f"# GENERATED by `align convert {spec.name}` from {variant.source} (transformers, installed),\n"
              f"# drafted by PaConvert {version} ({DRAFT_NAME}) and rewritten by align's rules (version "
              f"{RULES_VERSION}).\n# Do not edit or commit: see {REPORT_NAME} beside it.\n")
    code, rewrites, leftovers = rewrite(draft, variant.source, runtime_names(), header)
    report = ConversionReport(
        model=spec.name, port=variant.name, reference_file=str(source),
        reference_sha256=hashlib.sha256(source.read_bytes()).hexdigest(),
        output=str(out.relative_to(spec.root)), paconvert_version=version, rules_version=RULES_VERSION,
        converted=tuple(converted), unconverted=tuple(unconverted), rewrites=tuple(rewrites),
        leftovers=tuple(leftovers), total_uses=total, converted_uses=done)
    _write_dir_atomic(out.parent, {out.name: code, DRAFT_NAME: draft,
                                   REPORT_NAME: json.dumps(report.to_dict(), indent=2) + "\n"})
    return report


def load_port(spec: ModelSpec, variant: PortVariant) -> ModelSpec:
    """The spec with the generated port in place of the hand port. Imports the generated module
    (from build/, outside any package) under `align_<port>.<model>`."""
    path = generated_module(spec, variant)
    hint = f"run `align convert {spec.name}` first"
    if not path.is_file():
        raise ConfigError(spec.source, f"models.{spec.name}.ports.{variant.name}",
                          f"no generated port at {path.relative_to(spec.root)}; {hint}")
    meta = json.loads((path.parent / REPORT_NAME).read_text())
    source = module_file(variant.source, spec.source, f"models.{spec.name}.ports.{variant.name}.source")
    if (meta.get("reference_sha256") != hashlib.sha256(source.read_bytes()).hexdigest()
            or meta.get("rules_version") != RULES_VERSION):
        raise ConfigError(spec.source, f"models.{spec.name}.ports.{variant.name}",
                          f"{path.relative_to(spec.root)} was generated from another version of {variant.source} "
                          f"or of align's rules; {hint} again")
    name = import_name(spec, variant)
    # Executed afresh on every load: the file may have been regenerated (or, in a test, broken
    # on purpose) since the last one; a cached module would align stale code.
    found = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(found)
    sys.modules[name] = module  # build.import_object finds the port class by this name
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
    out = [f"{report.model}: {report.reference_file}",
           f"  PaConvert {report.paconvert_version}: {report.converted_uses}/{report.total_uses} torch API uses "
           f"converted ({100 * report.rate:.1f}%)"]
    for u in report.unconverted:
        out.append(f"  not converted: {u.name} x{u.count} (reference lines {', '.join(map(str, u.lines))})")
    by_rule: dict[str, int] = {}
    for r in report.rewrites:
        by_rule[r.rule] = by_rule.get(r.rule, 0) + 1
    out.append(f"  rewritten by align's rules: {len(report.rewrites)} lines "
               f"({', '.join(f'{k} {v}' for k, v in sorted(by_rule.items())) or 'none'})")
    for r in report.rewrites:
        if r.rule not in ("import-runtime", "import-transformers"):
            out.append(f"    draft line {r.line} ({r.rule}): {r.before.splitlines()[0][:90]}")
    out.append(f"  left for a human: {len(report.leftovers)}")
    for x in report.leftovers:
        out.append(f"    line {x.line}: {x.text[:80]} -- {x.why}")
    out.append(f"  wrote {report.output} and {Path(report.output).parent / REPORT_NAME}")
    return "\n".join(out)
