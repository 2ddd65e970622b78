"""The house's import rules (docs/architecture.md), held by reading every module's imports."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "opendino"

# module prefix -> package prefixes it must never import
FORBIDDEN = {
    "opendino.models": ("opendino.data", "opendino.losses", "opendino.train", "opendino.eval"),
    "opendino.data": ("opendino.models", "opendino.losses", "opendino.train", "opendino.eval"),
    "opendino.losses": ("opendino.models", "opendino.data", "opendino.train", "opendino.eval"),
    "opendino.eval": ("opendino.train", "opendino.losses"),
    "opendino.viz": ("opendino.train", "opendino.losses"),
    "opendino.demo": ("opendino.train", "opendino.losses"),
    "opendino.curate": ("opendino.train", "opendino.losses"),
    "opendino.config": ("opendino.",),
    "opendino.presets": ("opendino.models", "opendino.data", "opendino.losses", "opendino.train", "opendino.eval"),
    "opendino.dist": ("opendino.models", "opendino.data", "opendino.losses", "opendino.train", "opendino.eval"),
    "opendino.log": ("opendino.models", "opendino.data", "opendino.losses", "opendino.train", "opendino.eval"),
}
# the training stage is an end point: only the command line and the quickstart start it
TRAIN_IMPORTERS = {"opendino.cli", "opendino.quickstart"}
# cli.py may import only the config module (and, lazily, the run_* entry points of the stages)
CLI_ALLOWED_EAGER = {"opendino", "opendino.config"}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(tree: ast.AST, module: str, top_level_only: bool = False) -> set[str]:
    found = set()
    nodes = tree.body if top_level_only else ast.walk(tree)  # type: ignore[attr-defined]
    for node in nodes:
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import
                base = ".".join(module.split(".")[: -node.level] + ([base] if base else []))
            found |= {f"{base}.{a.name}" for a in node.names} | {base}
    return {name for name in found if name.startswith("opendino")}


def _all_modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        yield path, _module_name(path), ast.parse(path.read_text())


def test_layers_do_not_import_upwards():
    violations = []
    for _path, module, tree in _all_modules():
        for prefix, banned in FORBIDDEN.items():
            if module == prefix or module.startswith(prefix + "."):
                bad = sorted(i for i in _imports(tree, module) if i.startswith(banned) and not i.startswith(prefix))
                violations += [f"{module} imports {b}" for b in bad]
    assert violations == []


def test_nothing_but_the_entry_points_imports_train():
    violations = []
    for _path, module, tree in _all_modules():
        if module.startswith("opendino.train") or module in TRAIN_IMPORTERS:
            continue
        violations += [
            f"{module} imports {i}" for i in sorted(_imports(tree, module)) if i.startswith("opendino.train")
        ]
    assert violations == []


def test_cli_imports_only_config_at_module_level():
    tree = ast.parse((PACKAGE / "cli.py").read_text())
    eager = _imports(tree, "opendino.cli", top_level_only=True)
    assert eager <= CLI_ALLOWED_EAGER, eager - CLI_ALLOWED_EAGER


def test_the_rule_checker_sees_violations():
    tree = ast.parse("from opendino.train import loop\nfrom ..data import sources\n")
    assert _imports(tree, "opendino.models.vit") == {
        "opendino.train",
        "opendino.train.loop",
        "opendino.data",
        "opendino.data.sources",
    }
