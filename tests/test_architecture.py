"""The shape docs/architecture.md describes, kept true: a core without mitmproxy, small
classes, and no module reaching into another object's private state."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "addon" / "cooldown"
CORE = [
    "accounts",
    "backends/__init__",
    "backends/presence",
    "backends/redis",
    "backends/shared",
    "breaker",
    "config",
    "estimate",
    "gate",
    "held",
    "limiter",
    "listener",
    "metrics",
    "pacing",
    "periods",
    "probe",
    "prompt_cache",
    "queues",
    "runtime",
    "scheduler",
    "tickets",
    "upstream",
]
MAX_CLASS_LINES = 260


def modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def name_of(path: Path) -> str:
    """`backends/redis` for addon/cooldown/backends/redis.py."""
    return path.relative_to(PACKAGE).with_suffix("").as_posix()


def tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text(), filename=str(path))


@pytest.mark.parametrize("name", CORE)
def test_the_core_does_not_import_mitmproxy(name):
    imported = set()
    for node in ast.walk(tree(PACKAGE / f"{name}.py")):
        if isinstance(node, ast.Import):
            imported.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            imported.add(node.module.split(".")[0])
    assert "mitmproxy" not in imported


def test_every_module_is_listed_as_core_or_shell():
    shell = {"addon", "answers", "departures", "flows", "metering", "pages", "retry", "routing"}
    shell |= {"settings", "paced"}
    shell |= {"settle", "streams", "web", "__init__"}
    assert {name_of(path) for path in modules()} == shell | set(CORE)


@pytest.mark.parametrize("path", modules(), ids=name_of)
def test_no_class_is_longer_than_about_250_lines(path):
    for node in ast.walk(tree(path)):
        if isinstance(node, ast.ClassDef):
            length = node.end_lineno - node.lineno + 1
            assert length <= MAX_CLASS_LINES, f"{path.name}: {node.name} has {length} lines"


@pytest.mark.parametrize("path", modules(), ids=name_of)
def test_no_module_reaches_into_another_objects_private_state(path):
    """`x._name` only on `self` (or `cls`): a private attribute is its own class's business."""
    reaches = [
        f"{path.name}:{node.lineno}: {ast.unparse(node)}"
        for node in ast.walk(tree(path))
        if isinstance(node, ast.Attribute)
        and node.attr.startswith("_")
        and not node.attr.startswith("__")
        and not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"))
    ]
    assert reaches == []


def test_the_check_finds_a_reach_into_private_state(tmp_path):
    """The private-state check is not vacuous: it flags `other._x` and allows `self._x`."""
    sample = tmp_path / "sample.py"
    sample.write_text("class A:\n    def f(self, other):\n        return self._a + other._b\n")
    flagged = [
        ast.unparse(node)
        for node in ast.walk(tree(sample))
        if isinstance(node, ast.Attribute)
        and node.attr.startswith("_")
        and not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"))
    ]
    assert flagged == ["other._b"]
