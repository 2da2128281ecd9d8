"""What `pip install mmer-merge` ships, under which name, and that every place naming that name agrees.

The distribution is ``mmer-merge`` because ``mmer`` on PyPI is another project: a hint, link or extra that says
``mmer`` would install someone else's code. The command and the import package keep the name ``mmer``.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from mmer.version import DISTRIBUTION

ROOT = Path(__file__).resolve().parents[1]
tomllib = pytest.importorskip("tomllib", reason="Python 3.11+ reads TOML without a dependency")
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
README = (ROOT / "README.md").read_text(encoding="utf-8")
# Where users read install commands or links: the README, the docs, the examples, and the library's own hints.
SCANNED = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md")), *sorted((ROOT / "examples").rglob("*.md"))]
SCANNED += sorted(p for p in (ROOT / "mmer").rglob("*.py") if "__pycache__" not in p.parts)
SCANNED += sorted((ROOT / "cli").rglob("*.py"))


def test_every_library_package_is_listed_in_pyproject():
    listed = set(PYPROJECT["tool"]["setuptools"]["packages"])
    on_disk = {
        ".".join(init.parent.relative_to(ROOT).parts)
        for init in (ROOT / "mmer").rglob("__init__.py")
        if "__pycache__" not in init.parts
    }
    assert on_disk <= listed, f"add to [tool.setuptools] packages: {sorted(on_disk - listed)}"


def test_the_distribution_name_is_the_one_the_library_and_the_readme_use_and_the_command_stays_mmer():
    assert PYPROJECT["project"]["name"] == DISTRIBUTION == "mmer-merge"
    assert PYPROJECT["project"]["scripts"] == {"mmer": "mmer_cli.main:app"}
    assert "mmer" in PYPROJECT["tool"]["setuptools"]["packages"]  # `import mmer` is unchanged
    assert f"pip install {DISTRIBUTION}" in README
    assert f"`{DISTRIBUTION}[plot]`" in README


def test_an_extra_that_names_the_project_itself_uses_the_distribution_name():
    for extra, requirements in PYPROJECT["project"]["optional-dependencies"].items():
        for requirement in requirements:
            name = re.split(r"[\[<>=!~ ;]", requirement, maxsplit=1)[0]
            assert name.lower() != "mmer", f"extra {extra!r} requires {requirement!r}: PyPI's mmer is another project"


INSTALL_OF_THE_OTHER_MMER = re.compile(r"pip install[^\n`&;|]*?(?<![\w.-])['\"]?mmer(?:\[|['\"]?(?:\s|$|`))")
LINK_TO_THE_OTHER_MMER = re.compile(r"pypi\.org/project/mmer/")


@pytest.mark.parametrize("path", SCANNED, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_install_hint_or_link_names_the_other_projects_mmer(path):
    text = path.read_text(encoding="utf-8")
    assert not INSTALL_OF_THE_OTHER_MMER.search(text), f"{path.relative_to(ROOT)}: say `{DISTRIBUTION}`"
    assert not LINK_TO_THE_OTHER_MMER.search(text), f"{path.relative_to(ROOT)}: link pypi.org/project/{DISTRIBUTION}/"


def test_the_scan_would_catch_the_other_projects_name():
    for wrong in ("pip install mmer", "pip install 'mmer[plot]'", "`pip install mmer`", 'pip install "mmer[ray]"'):
        assert INSTALL_OF_THE_OTHER_MMER.search(wrong), wrong
    for right in (
        "pip install mmer-merge",
        "pip install 'mmer-merge[plot]'",
        "pip install -e . && mmer demo",
        "mmer merge",
    ):
        assert not INSTALL_OF_THE_OTHER_MMER.search(right), right


def test_the_readme_set_up_commands_install_torch_first_from_an_index_not_one_machines_wheel():
    commands = [line for line in README.splitlines() if line.startswith("pip install torch")]
    assert len(commands) == 2, commands  # the quick start's two commands: the demo, the tests
    for command in commands:
        first = command.split("&&")[0]
        assert "==" not in first and ".whl" not in first, "name an index, not one machine's torch build"
        assert "https://download.pytorch.org/whl/" in first
    assert "pytorch.org/get-started" in README  # how to pick a CUDA build instead


def test_the_model_card_links_the_distribution_name():
    from mmer.checkpoint import card

    assert card.PROJECT_URL == f"https://pypi.org/project/{DISTRIBUTION}/"
    assert "{PROJECT_URL}" in Path(card.__file__).read_text(encoding="utf-8")
