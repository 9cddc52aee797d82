"""python/tunex/_native.pyi declares exactly the native module's public exports, with the parameter
names, order and defaults of the pyo3 signatures (read through inspect from __text_signature__)."""

from __future__ import annotations

import ast
import inspect
import types
from pathlib import Path

import pytest
from tunex import _native

STUB = Path(_native.__file__).with_name("_native.pyi")


def _public(name: str) -> bool:
    return not name.startswith("_") or name == "__version__"


def stub_names(tree: ast.Module) -> dict[str, ast.AST]:
    """The stub's public top-level declarations: functions, classes and annotated names."""
    found: dict[str, ast.AST] = {}
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            name = node.name
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            name = node.target.id
        else:
            continue
        if _public(name):
            found[name] = node
    return found


def module_exports(module: types.ModuleType) -> set[str]:
    """What the module exports: its ``__all__`` plus any public attribute (a name missing from one is
    still an export)."""
    return {n for n in (*getattr(module, "__all__", ()), *dir(module)) if _public(n)}


_NO_DEFAULT = object()


def _stub_params(fn: ast.FunctionDef, method: bool) -> list[tuple[str, object]]:
    args = fn.args
    positional = [*args.posonlyargs, *args.args]
    defaults = [_NO_DEFAULT] * (len(positional) - len(args.defaults)) + list(args.defaults)
    params = list(zip((a.arg for a in positional), defaults))
    params += [(a.arg, _NO_DEFAULT if d is None else d) for a, d in zip(args.kwonlyargs, args.kw_defaults)]
    if method:
        params = params[1:]  # self
    out = []
    for name, default in params:
        if default is not _NO_DEFAULT:
            default = ast.literal_eval(default)  # `...` reads as Ellipsis, as inspect reads pyo3's "..."
        out.append((name, default))
    return out


def _real_params(obj: object) -> list[tuple[str, object]] | None:
    """(name, default) of a builtin's parameters, or None where inspect cannot read a signature."""
    try:
        sig = inspect.signature(obj)
    except (TypeError, ValueError):
        return None
    return [
        (p.name, _NO_DEFAULT if p.default is inspect.Parameter.empty else p.default) for p in sig.parameters.values()
    ]


def _compare(where: str, stub: list[tuple[str, object]], real: list[tuple[str, object]] | None) -> list[str]:
    if real is None:
        return []
    if [n for n, _ in stub] != [n for n, _ in real]:
        return [f"{where}: stub parameters {[n for n, _ in stub]} != module's {[n for n, _ in real]}"]
    bad = []
    for (name, d_stub), (_, d_real) in zip(stub, real):
        if (d_stub is _NO_DEFAULT) != (d_real is _NO_DEFAULT) or (d_stub is not _NO_DEFAULT and d_stub != d_real):
            show = lambda d: "none" if d is _NO_DEFAULT else repr(d)  # noqa: E731
            bad.append(f"{where}: parameter {name} default {show(d_stub)} in the stub, {show(d_real)} in the module")
    return bad


def stub_mismatches(source: str, module: types.ModuleType) -> list[str]:
    """Every way the stub ``source`` disagrees with ``module``; empty when they agree."""
    declared = stub_names(ast.parse(source))
    real = module_exports(module)
    problems = [f"{n}: exported by the module, missing from the stub" for n in sorted(real - declared.keys())]
    problems += [f"{n}: declared in the stub, not exported by the module" for n in sorted(declared.keys() - real)]
    for name in sorted(real & declared.keys()):
        node, obj = declared[name], getattr(module, name)
        if isinstance(node, ast.FunctionDef):
            if not callable(obj) or isinstance(obj, type):
                problems.append(f"{name}: a function in the stub, a {type(obj).__name__} in the module")
                continue
            problems += _compare(name, _stub_params(node, method=False), _real_params(obj))
        elif isinstance(node, ast.ClassDef):
            if not isinstance(obj, type):
                problems.append(f"{name}: a class in the stub, a {type(obj).__name__} in the module")
                continue
            methods = {m.name: m for m in node.body if isinstance(m, ast.FunctionDef)}
            real_methods = {m for m in vars(obj) if not m.startswith("_") and callable(getattr(obj, m))}
            public = {m for m in methods if not m.startswith("_")}
            problems += [
                f"{name}.{m}: a method of the class, missing from the stub" for m in sorted(real_methods - public)
            ]
            problems += [
                f"{name}.{m}: declared in the stub, not a method of the class" for m in sorted(public - real_methods)
            ]
            if "__init__" in methods:  # the constructor's signature is the class's __text_signature__
                problems += _compare(f"{name}()", _stub_params(methods["__init__"], method=True), _real_params(obj))
            for m in sorted(public & real_methods):
                real = _real_params(getattr(obj, m))
                problems += _compare(f"{name}.{m}", _stub_params(methods[m], method=True), real and real[1:])
    return problems


def test_the_stub_declares_every_export_with_its_signature():
    assert stub_mismatches(STUB.read_text(), _native) == []


def test_the_stub_parameters_are_checked_where_inspect_can_read_them():
    # the check above is only as good as inspect's view of the pyo3 signatures: every function of
    # the module (pyo3 gives each a __text_signature__) must have one, or the parameter comparison
    # silently checks nothing; a class has one when it has a constructor (#[new])
    unread = [
        n
        for n in module_exports(_native)
        if isinstance(getattr(_native, n), types.BuiltinFunctionType) and _real_params(getattr(_native, n)) is None
    ]
    assert unread == []
    assert _real_params(_native.ShardWriter) is not None and _real_params(_native.SafeReader) is not None


def _without(source: str, name: str) -> str:
    tree = ast.parse(source)
    tree.body = [n for n in tree.body if getattr(n, "name", None) != name]
    return ast.unparse(tree)


def test_a_missing_export_fails_the_check():
    problems = stub_mismatches(_without(STUB.read_text(), "rope_f32"), _native)
    assert problems == ["rope_f32: exported by the module, missing from the stub"]


def test_a_name_the_module_lacks_fails_the_check():
    source = STUB.read_text() + "\ndef rope_f64(x: int) -> None: ...\nclass SafeWriter: ...\n"
    assert stub_mismatches(source, _native) == [
        "SafeWriter: declared in the stub, not exported by the module",
        "rope_f64: declared in the stub, not exported by the module",
    ]


@pytest.mark.parametrize(
    "old,new,expect",
    [
        (
            "def dropout_f32(x: _F32, out: _F32, seed: int, p: float)",
            "def dropout_f32(x: _F32, seed: int, out: _F32, p: float)",
            "dropout_f32: stub parameters",
        ),
        (
            "dw: _F32 | None = None",
            "dw: _F32 | None",
            "rms_norm_backward_f32: parameter dw default none in the stub, None",
        ),
        ('prefix: str = "model"', 'prefix: str = "shard"', "ShardWriter(): parameter prefix default 'shard'"),
        ("def read(self, name: str)", "def read(self, tensor: str)", "SafeReader.read: stub parameters ['tensor']"),
        ("    def abort(self) -> None: ...\n", "", "ShardWriter.abort: a method of the class, missing from the stub"),
    ],
)
def test_a_wrong_signature_fails_the_check(old, new, expect):
    source = STUB.read_text()
    assert old in source
    problems = stub_mismatches(source.replace(old, new, 1), _native)
    assert len(problems) == 1 and problems[0].startswith(expect), problems
