"""align's rewrite rules: what makes PaConvert's draft runnable against align's runtime
(imports, buffers, torch semantics Paddle spells differently), and what is left for a human."""

from __future__ import annotations

import ast
import dataclasses
import io
import re
import tokenize
from dataclasses import dataclass
from pathlib import Path

from align.convert.sources import RUNTIMES, Sources, find_module, imported_module, uses_torch

RUNTIME = RUNTIMES["transformers"]


@dataclass(frozen=True)
class Rewrite:
    """A change align's rules made to PaConvert's draft (line numbers are the draft's)."""

    rule: str
    line: int
    before: str
    after: str
    why: str
    file: str = ""  # the generated file (a conversion writes one per converted module)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class Leftover:
    """Something neither PaConvert nor align's rules handled: a human must look."""

    line: int  # in the generated file
    text: str
    why: str
    file: str = ""
    imports: str = ""  # another package's torch module the generated code still imports

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def runtime_names(root: Path | None = None) -> set[str]:
    """Names align.convert.hf_runtime exports, read from its source (no paddle import needed)."""
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


def _import_rewrite(node: ast.ImportFrom, module: str, sources: Sources, known: set[str],
                    leftovers: list[Leftover]) -> tuple[str, str, str] | None:
    """How an import of the source package is rewritten (see sources.Sources.kind)."""
    target = imported_module(module, False, node.level, node.module)
    if sources.kind(target) == "other":
        return None
    subs = [a for a in node.names if f"{target}.{a.name}" in sources.modules]
    if subs:  # `from . import layers`: a converted module itself
        return ("import-converted", ", ".join(f"from . import {sources.stem(f'{target}.{a.name}')} as "
                                              f"{a.asname or a.name}" for a in subs).replace(", from", "; from"),
                f"{', '.join(a.name for a in subs)}: converted with it, in the generated package")
    names = ", ".join(a.name + (f" as {a.asname}" if a.asname else "") for a in node.names)
    kind = sources.kind(target)
    if kind == "converted":
        return ("import-converted", f"from .{sources.stem(target)} import {names}",
                f"{target} runs torch code too: converted with it, in the generated package")
    if kind == "runtime":
        for a in node.names:
            if a.name not in known:
                leftovers.append(Leftover(node.lineno, f"{a.name} (from {'.' * node.level}{node.module or ''})",
                                          f"align's runtime ({sources.runtime}) has no {a.name!r}"))
        return ("import-runtime", f"from {sources.runtime} import {names}",
                f"{sources.package}'s torch infrastructure is replaced by align's Paddle runtime")
    return (f"import-{sources.package}", f"from {target} import {names}",
            f"plain Python that never touches torch (a configuration class): the installed {sources.package}'s "
            "own is reused")


def _statement_rewrite(node: ast.stmt, src: str, module: str, sources: Sources, known: set[str],
                       leftovers: list[Leftover]) -> tuple[str, str, str] | None:
    """(rule, new statement, why) for a statement a rule applies to, else None."""
    seg = lambda n: ast.get_source_segment(src, n)  # noqa: E731
    if isinstance(node, ast.ImportFrom):
        return _import_rewrite(node, module, sources, known, leftovers)
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
    ("torch-by-name", r"\bgetattr\(torch,\s*", "hf_runtime.torch_function(",
     "a torch function looked up by name (a window, say) is beyond PaConvert; the runtime has its Paddle "
     "equivalent with torch's defaults (periodic windows)"),
)


def _code_names(text: str) -> list[tuple[int, str]]:
    """(line, name) of every NAME token, skipping strings and comments."""
    try:
        return [(t.start[0], t.string) for t in tokenize.generate_tokens(io.StringIO(text).readline)
                if t.type == tokenize.NAME]
    except (tokenize.TokenError, SyntaxError):
        return []


_PATCHED_METHOD = re.compile(r'setattr\(paddle\.Tensor,\s*"(\w+)"')


def rewrite(draft: str, reference_module: str, known: set[str], header: str = "",
            sources: Sources | None = None) -> tuple[str, list[Rewrite], list[Leftover]]:
    """Apply align's rules to PaConvert's draft of `reference_module`; returns the code
    (starting with `header`), what changed (at the draft's line numbers) and what is left (at
    the code's). `sources`: the conversion it is part of (default: this module alone)."""
    package = reference_module.split(".")[0]
    sources = sources or Sources(package, (reference_module,), runtime=RUNTIMES.get(package),
                                 scope=reference_module.rpartition(".")[0])
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
    edits = []
    for node in ast.walk(ast.parse(src)):
        if isinstance(node, ast.stmt) and (found := _statement_rewrite(node, src, reference_module, sources, known,
                                                                       leftovers)):
            rule, new, why = found
            edits.append((node.lineno, node.end_lineno, rule, new, why))
    for start, end, rule, new, why in sorted(edits, reverse=True):
        before = "\n".join(lines[start - 1:end])
        lines[start - 1:end] = [_indent(lines[start - 1]) + new]
        rewrites.append(Rewrite(rule, start, before.strip(), new, why))
    rewrites.sort(key=lambda r: r.line)
    # The runtime is imported once, after PaConvert's `import paddle`.
    at = next((i for i, line in enumerate(lines) if line.strip() == "import paddle"), -1)
    lines.insert(at + 1, f"from align.convert import hf_runtime  # added by align convert ({RUNTIME})")
    lines = header.splitlines() + lines
    text = "\n".join(lines) + "\n"
    for lineno, name in _code_names(text):
        if name == "torch":
            leftovers.append(Leftover(lineno, lines[lineno - 1].strip(), "still names torch"))
    for lineno, imported in _torch_imports(text, reference_module, sources):
        leftovers.append(Leftover(lineno, lines[lineno - 1].strip(), f"imports {imported}, whose code runs torch and "
                                                                     "is not converted", imports=imported))
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


def _torch_imports(text: str, module: str, sources: Sources) -> list[tuple[int, str]]:
    """(line, module) for each import the generated code still makes of another package's
    torch code (not torch itself, which PaConvert converts): the port would run torch there."""
    found = []
    try:
        tree = ast.parse(text)
    except SyntaxError:
        return found
    for node in ast.walk(tree):
        names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                 [imported_module(module, False, node.level, node.module)] if isinstance(node, ast.ImportFrom) and
                 not node.level else [])
        for name in names:
            top = name.split(".")[0]
            if top in ("torch", "paddle", "align", sources.package) or not name:
                continue
            path = find_module(name)
            if path is not None and uses_torch(path):
                found.append((node.lineno, name))
    return found


def _code_line(lines: list[str], text: str) -> int:
    """The line of the generated code that imports the name a leftover is about."""
    name = text.split()[0]
    return next((i + 1 for i, line in enumerate(lines) if line.startswith(f"from {RUNTIME} import")
                 and re.search(rf"\b{name}\b", line)), 0)
