"""The mutants of a module: small, behaviour-changing edits found by walking its AST.

``find_mutants(path)`` lists every edit (``Mutant``: where, which operator, the original and the
mutated text, and the byte range it replaces) whose result still parses; ``tools/mutate.py`` runs
the tests against each. The operators and what is never mutated are listed in
docs/mutation.md.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Operators: each maps one node kind to the one it becomes.
_BINOP = {ast.Add: ast.Sub, ast.Sub: ast.Add, ast.Mult: ast.Div, ast.Div: ast.Mult,
          ast.FloorDiv: ast.Div, ast.Pow: ast.Mult, ast.BitAnd: ast.BitOr, ast.BitOr: ast.BitAnd}
_CMPOP = {ast.Lt: ast.LtE, ast.LtE: ast.Lt, ast.Gt: ast.GtE, ast.GtE: ast.Gt, ast.Eq: ast.NotEq,
          ast.NotEq: ast.Eq, ast.Is: ast.IsNot, ast.IsNot: ast.Is, ast.In: ast.NotIn,
          ast.NotIn: ast.In}
_BOOLOP = {ast.And: ast.Or, ast.Or: ast.And}
_CALL_SWAP = {"mean": "sum", "sum": "mean", "max": "min", "min": "max", "amax": "amin",
              "amin": "amax", "maximum": "minimum", "minimum": "maximum", "argmax": "argmin",
              "argmin": "argmax"}
# ``device=`` only moves a tensor; on the CPU every test runs on, dropping it changes nothing.
_KEEP_KEYWORDS = {"device"}
PRAGMA = "pragma: no mutate"
# Surviving mutants that do not change behaviour, with the reason, one a line:
# ``path || source line || operator || original || why`` (the line stripped, so renumbering is
# harmless; ``||`` never occurs in Python source).
EQUIVALENTS = ROOT / "tools" / "mutation_equivalents.txt"


@dataclass(frozen=True)
class Mutant:
    path: str  # relative to ROOT
    line: int
    source_line: str  # the stripped text of that line
    op: str
    original: str
    mutated: str
    start: int  # byte offsets of the replaced segment in the UTF-8 source
    end: int

    def apply(self, source: str) -> str:
        data = source.encode("utf-8")
        return (data[:self.start] + self.mutated.encode("utf-8") + data[self.end:]).decode("utf-8")

    def key(self) -> tuple[str, str, str, str]:
        return self.path, self.source_line, self.op, " ".join(self.original.split())

    def describe(self) -> str:
        def short(text: str) -> str:
            text = " ".join(text.split())
            return text if len(text) <= 90 else text[:87] + "..."
        return f"{self.path}:{self.line}  [{self.op}]  {short(self.original)}  →  {short(self.mutated)}"


class _Finder(ast.NodeVisitor):
    """Collects the mutation points of one module, skipping docstrings, annotations,
    decorators, imports, ``raise`` statements, f-strings and lines marked ``# pragma: no mutate``."""

    def __init__(self, source: str, path: str, scope: set[str] | None = None) -> None:
        self.source, self.path, self.scope = source, path, scope
        self.data = source.encode("utf-8")
        self.lines = source.splitlines()
        starts, at = [], 0
        for line in self.data.splitlines(keepends=True):
            starts.append(at)
            at += len(line)
        self.line_starts = starts
        self.mutants: list[Mutant] = []
        self.bound: set[str] = set()

    # ---- recording -----------------------------------------------------------------------

    def _offsets(self, node: ast.AST) -> tuple[int, int]:
        return (self.line_starts[node.lineno - 1] + node.col_offset,
                self.line_starts[node.end_lineno - 1] + node.end_col_offset)

    def add(self, node: ast.AST, op: str, replacement: ast.AST | str) -> None:
        if PRAGMA in self.lines[node.lineno - 1]:
            return
        start, end = self._offsets(node)
        text = replacement if isinstance(replacement, str) else f"({ast.unparse(replacement)})"
        original = self.data[start:end].decode("utf-8")
        self.mutants.append(Mutant(self.path, node.lineno, self.lines[node.lineno - 1].strip(), op,
                                   original, text, start, end))

    # ---- statements ----------------------------------------------------------------------

    def _body(self, body: list[ast.stmt]) -> None:
        for i, stmt in enumerate(body):
            if i == 0 and _is_docstring(stmt):
                continue
            self.visit(stmt)

    def visit_Module(self, node: ast.Module) -> None:
        scope = self.scope
        for i, stmt in enumerate(node.body):
            named = isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
            if (i == 0 and _is_docstring(stmt)) or (
                    scope is not None and not (named and stmt.name in scope)):
                continue
            self.visit(stmt)

    def visit_Import(self, node: ast.AST) -> None:
        return

    visit_ImportFrom = visit_Raise = visit_Assert = visit_Global = visit_Nonlocal = visit_Import

    def visit_FunctionDef(self, node: ast.FunctionDef) -> None:
        outer = self.bound
        args = node.args
        self.bound = {a.arg for a in (*args.posonlyargs, *args.args, *args.kwonlyargs)}
        self.bound |= {a.arg for a in (args.vararg, args.kwarg) if a is not None}
        for default in (*args.defaults, *[d for d in args.kw_defaults if d is not None]):
            self.visit(default)
        self._body(node.body)
        self.bound = outer

    visit_AsyncFunctionDef = visit_FunctionDef

    def visit_ClassDef(self, node: ast.ClassDef) -> None:
        self._body(node.body)

    def visit_AnnAssign(self, node: ast.AnnAssign) -> None:
        if node.value is not None:
            self.visit(node.value)

    def visit_Assign(self, node: ast.Assign) -> None:
        names = [n for t in node.targets for n in _target_names(t)]
        if any(isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets):
            return
        rebinds = names and all(n in self.bound for n in names)
        if rebinds or any(isinstance(t, (ast.Subscript, ast.Attribute)) for t in node.targets):
            self.add(node, "drop statement", "pass")
        self.generic_visit(node)
        self.bound.update(names)

    def visit_AugAssign(self, node: ast.AugAssign) -> None:
        self.add(node, "drop statement", "pass")
        swap = _BINOP.get(type(node.op))
        if swap is not None:
            new = ast.AugAssign(target=node.target, op=swap(), value=node.value)
            self.add(node, f"{_name(node.op)}= → {_name(swap)}=", ast.unparse(new))
        self.visit(node.value)

    def visit_Expr(self, node: ast.Expr) -> None:
        if isinstance(node.value, ast.Constant):
            return
        self.add(node, "drop statement", "pass")
        self.generic_visit(node)

    def visit_For(self, node: ast.For) -> None:
        self.bound.update(_target_names(node.target))
        self.generic_visit(node)

    def visit_If(self, node: ast.If) -> None:
        self.add(node.test, "negate condition", ast.UnaryOp(op=ast.Not(), operand=node.test))
        self.generic_visit(node)

    visit_While = visit_If

    def visit_IfExp(self, node: ast.IfExp) -> None:
        self.add(node.test, "negate condition", ast.UnaryOp(op=ast.Not(), operand=node.test))
        self.generic_visit(node)

    # ---- expressions -----------------------------------------------------------------------

    def visit_JoinedStr(self, node: ast.JoinedStr) -> None:
        return

    def visit_BinOp(self, node: ast.BinOp) -> None:
        swap = _BINOP.get(type(node.op))
        if swap is not None:
            self.add(node, f"{_name(node.op)} → {_name(swap)}",
                     ast.BinOp(left=node.left, op=swap(), right=node.right))
        self.generic_visit(node)

    def visit_Compare(self, node: ast.Compare) -> None:
        for i, op in enumerate(node.ops):
            swap = _CMPOP.get(type(op))
            if swap is not None:
                ops = list(node.ops)
                ops[i] = swap()
                self.add(node, f"{_name(op)} → {_name(swap)}",
                         ast.Compare(left=node.left, ops=ops, comparators=node.comparators))
        self.generic_visit(node)

    def visit_BoolOp(self, node: ast.BoolOp) -> None:
        swap = _BOOLOP[type(node.op)]
        self.add(node, f"{_name(node.op)} → {_name(swap)}", ast.BoolOp(op=swap(), values=node.values))
        self.generic_visit(node)

    def visit_UnaryOp(self, node: ast.UnaryOp) -> None:
        if isinstance(node.op, ast.USub) and isinstance(node.operand, ast.Constant) and (
                node.operand.value == 1):
            return  # -1 is a dimension or index: on the [B, T] tensors here it names the same as 1
        if isinstance(node.op, (ast.Not, ast.USub)):
            self.add(node, f"drop {_name(node.op)}", node.operand)
        self.generic_visit(node)

    def visit_Constant(self, node: ast.Constant) -> None:
        value = node.value
        if isinstance(value, bool):
            self.add(node, f"{value} → {not value}", ast.Constant(not value))
        elif isinstance(value, (int, float)):
            new = 1 if value == 0 else 0 if value == 1 else value + 1
            self.add(node, f"{value!r} → {new!r}", ast.Constant(type(value)(new)))

    def visit_Call(self, node: ast.Call) -> None:
        func = node.func
        attr = func.attr if isinstance(func, ast.Attribute) else (
            func.id if isinstance(func, ast.Name) else None)
        if attr in _CALL_SWAP and (isinstance(func, ast.Attribute) or attr in ("max", "min")):
            new_func = (ast.Attribute(value=func.value, attr=_CALL_SWAP[attr], ctx=ast.Load())
                        if isinstance(func, ast.Attribute) else ast.Name(_CALL_SWAP[attr], ast.Load()))
            self.add(node, f"{attr}() → {_CALL_SWAP[attr]}()",
                     ast.Call(func=new_func, args=node.args, keywords=node.keywords))
        for i, kw in enumerate(node.keywords):
            if kw.arg is not None and kw.arg not in _KEEP_KEYWORDS and not _is_default_dtype(kw):
                self.add(node, f"drop {kw.arg}=",
                         ast.Call(func=func, args=node.args,
                                  keywords=node.keywords[:i] + node.keywords[i + 1:]))
        self.generic_visit(node)

    def visit_Lambda(self, node: ast.Lambda) -> None:
        self.visit(node.body)


def _is_default_dtype(kw: ast.keyword) -> bool:
    """``dtype=torch.float32``: dropping it changes nothing under torch's default dtype."""
    return kw.arg == "dtype" and ast.unparse(kw.value) == "torch.float32"


def _is_docstring(stmt: ast.stmt) -> bool:
    return isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Constant) and isinstance(
        stmt.value.value, str)


def _target_names(target: ast.AST) -> list[str]:
    if isinstance(target, ast.Name):
        return [target.id]
    if isinstance(target, (ast.Tuple, ast.List)):
        return [n for elt in target.elts for n in _target_names(elt)]
    return []


def _name(op: object) -> str:
    cls = op if isinstance(op, type) else type(op)
    return {"Add": "+", "Sub": "-", "Mult": "*", "Div": "/", "FloorDiv": "//", "Pow": "**",
            "BitAnd": "&", "BitOr": "|", "Lt": "<", "LtE": "<=", "Gt": ">", "GtE": ">=",
            "Eq": "==", "NotEq": "!=", "Is": "is", "IsNot": "is not", "In": "in",
            "NotIn": "not in", "And": "and", "Or": "or", "Not": "not", "USub": "unary -"
            }[cls.__name__]


def read_equivalents(path: Path = EQUIVALENTS) -> dict[tuple[str, str, str, str], str]:
    """``(path, source line, op, original) → reason`` of the known equivalent mutants."""
    out = {}
    if path.exists():
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip() and not line.startswith("#"):
                where, text, op, original, reason = (p.strip() for p in line.split(" || ", 4))
                out[where, text, op, " ".join(original.split())] = reason
    return out


def find_mutants(path: Path, root: Path = ROOT, scope: set[str] | None = None) -> list[Mutant]:
    """Every mutant of the module at ``path`` whose source still compiles; with ``scope``, only
    in those top-level functions and classes."""
    source = path.read_text(encoding="utf-8")
    finder = _Finder(source, str(path.resolve().relative_to(root.resolve())), scope)
    finder.visit(ast.parse(source))
    out = []
    for m in finder.mutants:
        try:
            ast.parse(m.apply(source))
        except SyntaxError:
            continue
        out.append(m)
    return out
