"""The docs point only at files that exist: every repository path in backticks, every relative link."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.conftest import ROOT

DOCS = [*sorted((ROOT / "docs").glob("*.md")), ROOT / "README.md", ROOT / "infra/examples/basic/README.md"]
# top-level entries of the repository: a backticked word starting with one of these is a repo path
TOP = ("layers", "agent", "functions", "infra", "tests", "docs", "examples", "requirements")
TOP_FILES = ("template.yaml", "Makefile", "pyproject.toml", "README.md")
# file kinds that, mentioned by bare name or partial path (`engine/compiler.py`), must be somewhere here
SOURCE_SUFFIXES = (".py", ".md", ".tf")
_CODE = re.compile(r"`([^`\n]+)`")
_LINK = re.compile(r"\]\(([^)\s]+)\)")
_LOCATION = re.compile(r"(:\d+)+:?$")  # file.yaml:20:20 → file.yaml


def _as_glob(word: str) -> str:
    """Placeholders (`functions/<name>`) match any one path segment."""
    return re.sub(r"<[^>/]*>", "*", word)


def _exists(pattern: str, base: Path) -> bool:
    pattern = pattern.rstrip("/")
    if any(c in pattern for c in "*?["):
        return any(base.glob(pattern))
    return (base / pattern).exists()


def _repo_files() -> list[str]:
    out = []
    for top in (*TOP, *TOP_FILES):
        p = ROOT / top
        if p.is_file():
            out.append(top)
        elif p.is_dir():
            out += [f.relative_to(ROOT).as_posix() for f in p.rglob("*") if "__pycache__" not in f.parts]
    return out


def _somewhere(name: str, files: list[str]) -> bool:
    """A bare or partial path (`engine/compiler.py`) names some file of the repository."""
    return any(f == name or f.endswith("/" + name) for f in files)


def missing_paths(doc: Path, text: str, files: list[str]) -> list[str]:
    """The repository paths ``text`` mentions that do not exist (each as ``doc: path``)."""
    missing = []
    for target in _LINK.findall(text):
        if re.match(r"^[a-z]+:", target) or target.startswith("#"):
            continue  # a URL or an anchor in the same page
        path = target.split("#", 1)[0]
        if not _exists(path, doc.parent):
            missing.append(f"{doc.name}: link {target}")
    for code in _CODE.findall(text):
        for word in code.split():
            word = _LOCATION.sub("", word.strip(".,;()'\""))
            if not word or word.startswith(("/", "http")) or "…" in word:
                continue
            first = word.split("/", 1)[0]
            if (first in TOP and "/" in word) or word in TOP_FILES:
                if not _exists(_as_glob(word), ROOT):
                    missing.append(f"{doc.name}: {word}")
            elif word.endswith(SOURCE_SUFFIXES) and not any(c in word for c in "<*") and not _somewhere(word, files):
                missing.append(f"{doc.name}: {word}")
    return missing


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_docs_mention_only_existing_repo_paths(doc: Path) -> None:
    assert missing_paths(doc, doc.read_text(), _repo_files()) == []


def test_the_path_check_finds_what_is_missing() -> None:
    text = (
        "See `layers/core/ringfence/cli.py`, `functions/<name>`, `engine/compiler.py`,\n"
        "`layers/core/ringfence/flows.py`, `reference/cloud_events.md` and [the agent](agent.md#x),\n"
        "[gone](nowhere.md), and run `.venv/bin/ringfence compile --policy examples/nope/policy`."
    )
    assert missing_paths(ROOT / "docs" / "design.md", text, _repo_files()) == [
        "design.md: link nowhere.md",
        "design.md: layers/core/ringfence/flows.py",
        "design.md: reference/cloud_events.md",
        "design.md: examples/nope/policy",
    ]


def test_the_threat_model_names_every_attack_test_and_only_tests_that_exist() -> None:
    """docs/threat-model.md cites tests by name: each must exist, and every ``test_attack_*`` in
    the suite must be cited (a new attack test is a new line of the threat model)."""
    cited = set(re.findall(r"`(test_\w+)`", (ROOT / "docs/threat-model.md").read_text()))
    defined = {
        m for f in (ROOT / "tests").rglob("test_*.py") for m in re.findall(r"^def (test_\w+)", f.read_text(), re.M)
    }
    assert cited - defined == set(), "cited but not defined"
    assert {t for t in defined if t.startswith("test_attack_")} - cited == set(), "attack tests not in the threat model"
