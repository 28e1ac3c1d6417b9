"""The README stays a front door and the manual in docs/ stays true to the repository."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]
#: Modules run with ``python -m`` that are installed packages, not files of this repository.
INSTALLED_MODULES = {"pytest", "pip", "venv"}


def read(path: Path) -> str:
    return path.read_text(encoding="utf-8")


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link's text only
    return re.sub(r"[^\w\- ]", "", text.strip().lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """The anchors of ``path``'s headings (outside code fences), duplicates numbered as GitHub does."""
    found, seen, fenced = set(), {}, False
    for line in read(path).splitlines():
        if line.startswith("```"):
            fenced = not fenced
        match = None if fenced else re.match(r"#{1,6} (.+?)#*\s*$", line)
        if match:
            base = slug(match.group(1))
            count = seen.get(base, 0)
            seen[base] = count + 1
            found.add(base if count == 0 else f"{base}-{count}")
    return found


def links(path: Path) -> list[str]:
    """The targets of the Markdown links of ``path`` that are not inside code."""
    text = re.sub(r"```.*?```", "", read(path), flags=re.S)
    text = re.sub(r"`[^`\n]*`", "", text)
    return re.findall(r"\]\(([^)\s]+)\)", text)


def test_readme_is_at_most_200_lines():
    assert len(read(README).splitlines()) <= 200


def test_quick_start_has_exactly_two_commands():
    quick = read(README).split("## Quick start", 1)[1].split("##", 1)[0]
    block = re.search(r"```bash\n(.*?)```", quick, flags=re.S).group(1)
    assert [line.split("#")[0].strip() for line in block.strip().splitlines()] == ["make train", "make test"]


def test_run_folder_table_lists_what_a_run_writes():
    text = read(ROOT / "docs" / "training.md")
    table = text.split("### What a run folder holds", 1)[1].split("\n#", 1)[0]
    for name in ("config.json", "checkpoint.pth", "best_model.pth", "metrics.csv", "summary.json",
                 "learning_curves.png", "train.log", "tensorboard/"):
        assert f"| `{name}` |" in table, name


@pytest.mark.parametrize("page", PAGES, ids=[p.relative_to(ROOT).as_posix() for p in PAGES])
def test_relative_links_point_at_files_and_headings(page):
    broken = []
    for target in links(page):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        file_part, _, anchor = target.partition("#")
        dest = (page.parent / file_part).resolve() if file_part else page
        if not dest.is_file():
            broken.append(f"{target}: no file {dest.relative_to(ROOT) if dest.is_relative_to(ROOT) else dest}")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(f"{target}: no heading '#{anchor}' in {dest.relative_to(ROOT)}")
    assert not broken, f"{page.relative_to(ROOT)}: " + "; ".join(broken)


@pytest.mark.parametrize("page", PAGES, ids=[p.relative_to(ROOT).as_posix() for p in PAGES])
def test_python_m_modules_are_files_of_the_repository(page):
    missing = []
    for module in sorted(set(re.findall(r"python3? -m ([A-Za-z_][\w.]*\w)", read(page)))):
        if module.split(".")[0] in INSTALLED_MODULES:
            continue
        path = ROOT / module.replace(".", "/")
        if not (path.with_suffix(".py").is_file() or (path / "__main__.py").is_file()):
            missing.append(module)
    assert not missing, f"{page.relative_to(ROOT)} runs modules that are not in the repository: {missing}"


@pytest.mark.parametrize("page", PAGES, ids=[p.relative_to(ROOT).as_posix() for p in PAGES])
def test_named_configs_exist(page):
    named = set(re.findall(r"\bconfigs/[\w.-]+\.json\b", read(page)))
    missing = sorted(name for name in named if not (ROOT / name).is_file())
    assert not missing, f"{page.relative_to(ROOT)} names configs that do not exist: {missing}"
