"""The package's layout: the library (lm_infinite, everything but lm_infinite.apps) and the
applications built on it (lm_infinite.apps: CLI, server, evaluation, bench_common; and the
scripts under bench/). Applications use only the library's public names; the library never
imports an application. Checked statically with `ast`, nothing is imported.

Public, for an application: a library module whose dotted name has no component starting with
an underscore and that is not inside lm_infinite.hf (the package is public, its modules
families, patching, state, ... are not); from such a module, the names in its `__all__`
(a submodule that is itself public counts too)."""

from __future__ import annotations

import ast
from functools import lru_cache
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "python" / "lm_infinite"
APPS = PACKAGE / "apps"
# Deprecated aliases of the old module paths: library-level files that re-export apps on purpose.
ALIASES = {PACKAGE / "cli.py", PACKAGE / "server.py", PACKAGE / "eval.py"}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def module_file(name: str) -> Path | None:
    base = PACKAGE.parent.joinpath(*name.split("."))
    for candidate in (base / "__init__.py", base.with_suffix(".py")):
        if candidate.is_file():
            return candidate
    return None


@lru_cache(maxsize=None)
def exported(name: str) -> frozenset[str]:
    """The names in module `name`'s literal __all__ (empty when it has none)."""
    path = module_file(name)
    if path is None:
        return frozenset()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets):
            return frozenset(ast.literal_eval(node.value))
    return frozenset()


def is_application(name: str) -> bool:
    return name == "lm_infinite.apps" or name.startswith("lm_infinite.apps.")


def private_module(name: str) -> bool:
    parts = name.split(".")
    return any(part.startswith("_") for part in parts) or (len(parts) > 2 and parts[:2] == ["lm_infinite", "hf"])


def absolute(node: ast.ImportFrom, importer: str, is_package: bool) -> str:
    if not node.level:
        return node.module or ""
    base = importer.split(".") if is_package else importer.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imports_of(path: Path, tree: ast.AST | None = None):
    """(line, imported module, [names] or None, {alias: module}) for every import in a file."""
    tree = tree or ast.parse(path.read_text(), filename=str(path))
    importer = module_name(path) if path.is_relative_to(PACKAGE) else path.stem
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name, None, {alias.asname: alias.name} if alias.asname else {}
        elif isinstance(node, ast.ImportFrom):
            module = absolute(node, importer, path.name == "__init__.py")
            yield node.lineno, module, [a.name for a in node.names], {}


def violations(path: Path, source: str | None = None) -> list[str]:
    """What `path`, an application, imports from the library that is not public."""
    found, aliases = [], {}
    where = path.relative_to(ROOT)
    tree = ast.parse(path.read_text() if source is None else source, filename=str(path))
    for line, module, names, bound in imports_of(path, tree):
        if not (module == "lm_infinite" or module.startswith("lm_infinite.")) or is_application(module):
            continue
        aliases.update(bound)
        if private_module(module):
            found.append(f"{where}:{line}: imports the private module {module}")
            continue
        for name in names or []:
            submodule = f"{module}.{name}"
            public_submodule = module_file(submodule) is not None and not private_module(submodule)
            if name not in exported(module) and not public_submodule:
                found.append(f"{where}:{line}: imports {name} from {module}, which is not in its __all__")
    # Attributes of an aliased library module (import lm_infinite.hf as lminf_hf; lminf_hf.X).
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases:
            module = aliases[node.value.id]
            submodule = f"{module}.{node.attr}"
            if node.attr not in exported(module) and (module_file(submodule) is None or private_module(submodule)):
                found.append(f"{where}:{node.lineno}: uses {module}.{node.attr}, which is not in its __all__")
    return found


def application_files() -> list[Path]:
    return sorted(APPS.rglob("*.py")) + sorted((ROOT / "bench").glob("*.py"))


def library_files() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if not p.is_relative_to(APPS) and p not in ALIASES)


def test_the_layout_has_both_halves():
    assert {p.name for p in APPS.iterdir()} >= {"cli", "server", "eval", "bench_common.py", "__init__.py"}
    assert len(library_files()) > 10 and len(application_files()) > 30


def test_applications_import_only_public_names_of_the_library():
    found = [v for path in application_files() for v in violations(path)]
    assert not found, "\n".join(found)


def test_the_checker_catches_private_imports():
    probe = ROOT / "bench" / "layout_probe.py"  # not written: the source is given
    source = ("from lm_infinite.hf.families import decoder_of\n"
              "from lm_infinite.top_k_rows import _rotate\n"
              "from lm_infinite import _C\n"
              "import lm_infinite.hf as h\nh.patching\nh.enable\n"
              "from lm_infinite.hf import decoder_of\n")
    found = violations(probe, source)
    assert len(found) == 4, found
    assert "private module lm_infinite.hf.families" in found[0] and "_rotate" in found[1]
    assert "_C" in found[2] and "lm_infinite.hf.patching" in found[3]


def test_the_library_never_imports_an_application():
    found = []
    for path in library_files():
        for line, module, names, _ in imports_of(path):
            targets = [module] + [f"{module}.{n}" for n in names or []]
            if any(is_application(t) for t in targets):
                found.append(f"{path.relative_to(ROOT)}:{line}: imports {module}")
    assert not found, "\n".join(found)
