"""Rules of the code's layout, checked on the source: switches are read only through tunex.settings."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "python" / "tunex"


def _environ_reads(tree: ast.AST) -> list[tuple[int, str]]:
    """(line, name) of every ``os.environ[...]``, ``os.environ.get(...)``, ``os.getenv(...)`` whose
    name is a ``TUNEX_*`` string, directly or through a module constant."""
    consts = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str):
            for target in node.targets:
                if isinstance(target, ast.Name):
                    consts[target.id] = node.value.value

    def name_of(arg: ast.AST) -> str | None:
        if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
            return arg.value
        if isinstance(arg, ast.Name):
            return consts.get(arg.id)
        return None

    def is_environ(node: ast.AST) -> bool:
        return (isinstance(node, ast.Attribute) and node.attr == "environ") or (
            isinstance(node, ast.Name) and node.id == "environ"
        )

    found = []
    for node in ast.walk(tree):
        key = None
        if isinstance(node, ast.Subscript) and is_environ(node.value):
            key = name_of(node.slice)
        elif isinstance(node, ast.Call) and node.args:
            func = node.func
            if isinstance(func, ast.Attribute) and (
                (func.attr in ("get", "pop", "setdefault") and is_environ(func.value)) or func.attr == "getenv"
            ):
                key = name_of(node.args[0])
            elif isinstance(func, ast.Name) and func.id == "getenv":
                key = name_of(node.args[0])
        if key is not None and key.startswith("TUNEX_"):
            found.append((node.lineno, key))
    return found


def test_no_switch_is_read_outside_settings():
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path == PACKAGE / "settings.py":
            continue
        for line, name in _environ_reads(ast.parse(path.read_text(), str(path))):
            offenders.append(f"{path.relative_to(PACKAGE)}:{line} reads {name}")
    assert not offenders, "read switches through tunex.settings: " + "; ".join(offenders)


def test_the_check_catches_each_form():
    src = 'import os\nV = "TUNEX_X"\nos.environ["TUNEX_A"]\nos.environ.get("TUNEX_B")\nos.getenv(V)\nos.environ.get("HOME")\n'
    assert [name for _, name in _environ_reads(ast.parse(src))] == ["TUNEX_A", "TUNEX_B", "TUNEX_X"]


def test_settings_doc_lists_every_switch_once():
    from tunex import settings

    doc = (PACKAGE.parents[1] / "docs" / "SETTINGS.md").read_text()
    table = doc.split("<!-- switches:begin -->\n", 1)[1].split("<!-- switches:end -->", 1)[0]
    assert table == settings.markdown_table(), "docs/SETTINGS.md is stale: regenerate its table (see the doc)"
    for name in settings.SWITCHES:
        assert doc.count(f"`{name}`") == 1, name


MACHINERY = (
    "tunex.runtime.arena",
    "tunex.runtime.offload",
    "tunex.runtime.rebuild",
    "tunex.runtime.malloc",
    "tunex.runtime.decode",
    "tunex.runtime.compose",
    "tunex.kernels.gemv.linear_many",
    "tunex.kernels.gemv.rms_norm_row",
)


def _imports(tree: ast.AST) -> list[str]:
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names += [node.module] + [f"{node.module}.{a.name}" for a in node.names]
    return names


def test_model_files_import_no_memory_or_decode_machinery():
    """models/ holds the math; the arena, rebuilds, offload and decode path come through tunex.runtime's hooks."""
    offenders = []
    for path in sorted((PACKAGE / "models").rglob("*.py")):
        for name in _imports(ast.parse(path.read_text(), str(path))):
            if any(name == m or name.startswith(m + ".") for m in MACHINERY):
                offenders.append(f"{path.relative_to(PACKAGE)} imports {name}")
    assert not offenders, "; ".join(offenders)
    src = "from tunex.runtime.arena import kept_add\nimport tunex.runtime.offload\nfrom tunex import runtime\n"
    assert sorted(n for n in _imports(ast.parse(src)) if any(n.startswith(m) for m in MACHINERY)) == [
        "tunex.runtime.arena",
        "tunex.runtime.arena.kept_add",
        "tunex.runtime.offload",
    ]


def test_kernels_do_not_import_the_runtime():
    """Layering: the runtime composes kernels, never the reverse (kernels allocate kept tensors
    through tunex.kernels.kept, where the runtime's arena plugs in)."""
    offenders = []
    for path in sorted((PACKAGE / "kernels").rglob("*.py")):
        for name in _imports(ast.parse(path.read_text(), str(path))):
            if name == "tunex.runtime" or name.startswith("tunex.runtime."):
                offenders.append(f"{path.relative_to(PACKAGE)} imports {name}")
    assert not offenders, "; ".join(offenders)


def test_only_the_registry_reads_the_kernel_switches():
    """The switches that pick an implementation are read in the registry's conditions only."""
    kernel_switches = ("TUNEX_GEMV", "TUNEX_ONEDNN", "TUNEX_NATIVE_ATTENTION", "TUNEX_FUSED_LORA", "TUNEX_KERNELS")
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.name in ("registry.py", "settings.py") or "commands" in path.parts:
            continue
        text = path.read_text()
        offenders += [f"{path.relative_to(PACKAGE)} reads {n}" for n in kernel_switches if f'"{n}"' in text]
    assert not offenders, "; ".join(offenders)
