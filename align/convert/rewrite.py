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

RUNTIME = "align.convert.hf_runtime"


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
    lines.insert(at + 1, f"from align.convert import hf_runtime  # added by align convert ({RUNTIME})")
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
