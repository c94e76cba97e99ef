"""The tree as the README shows it, and modules a newcomer can read: the README's Layout names
every package, module and top-level folder there is (and nothing else), no module runs over
about 300 lines and no function over about 60."""

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "platform" / "distar"
MAX_MODULE_LINES, MAX_FUNCTION_LINES = 310, 65  # "about 300" and "about 60"


def layout() -> list[tuple[int, str, str]]:
    """The README's Layout block as (indent, name, description with its continuation lines)."""
    text = (ROOT / "README.md").read_text()
    block = text[text.index("## Layout"):]
    block = block[block.index("```\n") + 4:]
    block = block[: block.index("```")]
    entries = []
    for line in block.splitlines():
        name = re.match(r"( *)(\S+)\s{2,}(.*)", line)
        if name and not line.startswith(" " * 6):
            entries.append((len(name.group(1)), name.group(2), name.group(3)))
        else:
            indent, first, description = entries[-1]
            entries[-1] = (indent, first, f"{description} {line.strip()}")
    return entries


def test_the_readme_layout_lists_every_top_level_folder():
    listed = {name.rstrip("/") for indent, name, _ in layout() if indent == 0}
    folders = {p.name for p in ROOT.iterdir() if p.is_dir() and not p.name.startswith(".") and p.name not in ("runs", "mlartifacts")}
    assert listed == (folders - {"platform"}) | {"platform/distar"}


def test_the_readme_layout_lists_every_module_and_package_of_distar():
    listed = {name.rstrip("/"): description for indent, name, description in layout() if indent == 2}
    present = {p.name.removesuffix(".py") if p.is_file() else p.name for p in PACKAGE.iterdir()
               if p.name not in ("__init__.py", "__pycache__") and (p.suffix == ".py" or p.is_dir())}
    assert {n.removesuffix(".py") for n in listed} == present
    for package in (p for p in PACKAGE.iterdir() if p.is_dir() and p.name != "__pycache__"):
        description = listed[f"{package.name}"].lower()
        for module in sorted(package.glob("*.py")):
            if module.name == "__init__.py":
                continue
            words = re.escape(module.stem).replace("_", "[ _-]")
            assert re.search(rf"\b{words}", description), f"README Layout: {package.name}/ does not name {module.name}"


def sources() -> list[Path]:
    return sorted(p for d in ("platform", "jobs", "bench", "tests") for p in (ROOT / d).rglob("*.py"))


@pytest.mark.parametrize("path", sources(), ids=lambda p: str(p.relative_to(ROOT)))
def test_modules_and_functions_stay_readable(path):
    text = path.read_text()
    assert len(text.splitlines()) <= MAX_MODULE_LINES, f"{len(text.splitlines())} lines"
    long = [f"{node.name} ({node.end_lineno - node.lineno + 1} lines)" for node in ast.walk(ast.parse(text))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES]
    assert not long


def test_every_package_folder_is_a_package():
    """setuptools' find_packages (pyproject) installs only folders with an __init__.py: the image
    and `pip install .` would miss any other."""
    folders = {p.parent for p in PACKAGE.rglob("*.py")}
    assert [str(f.relative_to(PACKAGE)) for f in sorted(folders) if not (f / "__init__.py").is_file()] == []
