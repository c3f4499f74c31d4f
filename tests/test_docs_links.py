"""The documentation points at things that exist, and its runnable examples run.

Checked in README.md, docs/*.md, scripts/README.md and csrc/cuda/NOTES.md:
- every relative markdown link and image (`[text](path)`, `[text](path#anchor)`), resolved
  from the file's folder: the file or folder exists, and an anchor into a markdown file names
  one of its headings (GitHub's slugs);
- every code span that looks like a repository path (`bench/e2e.py`, `docs/`, `csrc/cuda/*.cu`,
  or the script of `python bench/x.py ...` / `bash scripts/y.sh ...`), resolved from the
  repository root: it exists (a glob matches something).
And the README's python blocks marked `<!-- runnable ... -->` run, in order, on a tiny model.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "scripts" / "README.md",
        ROOT / "csrc" / "cuda" / "NOTES.md"]
# First components of the repository paths the docs cite, and files at its root.
TOP_LEVEL = ("csrc/", "lminf_ext/", "python/", "tests/", "bench/", "scripts/", "docs/", "examples/", ".ci/")
ROOT_FILES = ("README.md", "setup.py", "pyproject.toml", "CMakeLists.txt", "LICENSE")

FENCE = re.compile(r"^```.*?^```", re.S | re.M)
LINK = re.compile(r"!?\[(?:[^\]\[]|\[[^\]]*\])*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
CODE_SPAN = re.compile(r"`([^`\n]+)`")


def prose(text: str) -> str:
    """The text outside fenced code blocks (links and spans in a block are code, not references)."""
    return FENCE.sub("", text)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*_]|\[([^\]]*)\]\([^)]*\)", lambda m: m.group(1) or "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    return {slug(line.lstrip("#")) for line in prose(path.read_text()).splitlines() if line.startswith("#")}


def links(path: Path):
    for target in LINK.findall(prose(path.read_text())):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto:
            continue
        yield target


def cited_paths(path: Path):
    """Repository paths in code spans: a span that is a path, or the script a span runs."""
    for span in CODE_SPAN.findall(prose(path.read_text())):
        words = span.split()
        if len(words) > 1 and words[0] in ("python", "python3", "bash", "sh"):
            candidate = words[1]
        elif len(words) == 1:
            candidate = words[0]
        else:
            continue
        candidate = candidate.split("::")[0].rstrip(".,;:")
        if candidate.startswith(TOP_LEVEL) or candidate in ROOT_FILES:
            yield candidate


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(doc):
    broken = []
    for target in links(doc):
        file_part, _, anchor = target.partition("#")
        resolved = (doc.parent / file_part).resolve() if file_part else doc
        if not resolved.exists():
            broken.append(f"{target}: no {resolved}")
        elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
            broken.append(f"{target}: {resolved.name} has no heading #{anchor}")
    assert not broken, f"{doc.relative_to(ROOT)}:\n" + "\n".join(broken)


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_cited_repository_path_exists(doc):
    missing = [p for p in cited_paths(doc) if not (list(ROOT.glob(p.rstrip("/"))) if "*" in p else (ROOT / p).exists())]
    assert not missing, f"{doc.relative_to(ROOT)} cites paths that do not exist: {missing}"


def test_the_checks_catch_what_they_should(tmp_path):
    assert slug("1. Semantics (normative: every backend computes exactly this)") == \
        "1-semantics-normative-every-backend-computes-exactly-this"
    assert slug("Command line: `lminf`") == "command-line-lminf"
    doc = tmp_path / "page.md"
    doc.write_text("# Title\n[a](missing.md) ![b](img.png) [c](https://x.org) [d](#title)\n"
                   "`bench/nope.py`, `python scripts/nope.sh --x`, `tests/`, `not/a/repo/path`\n"
                   "```\n[in a block](ignored.md) `bench/ignored.py`\n```\n")
    assert list(links(doc)) == ["missing.md", "img.png", "#title"]
    assert list(cited_paths(doc)) == ["bench/nope.py", "scripts/nope.sh", "tests/"]
    assert anchors(doc) == {"title"}


def runnable_blocks(text: str) -> list[str]:
    """The ```python blocks right after a `<!-- runnable ... -->` line."""
    return re.findall(r"^<!-- runnable[^\n]*-->\n```python\n(.*?)^```", text, re.S | re.M)


def test_the_readme_examples_run(tmp_path, monkeypatch, capsys):
    """The README's Hugging Face and streaming examples, as written, on a tiny random model
    (load_model() gives it instead of SmolLM2): they run and print a continuation."""
    import lm_infinite.models
    from tiny_model_dir import save_tiny_model

    blocks = runnable_blocks((ROOT / "README.md").read_text())
    assert len(blocks) >= 2 and "load_model()" in blocks[0] and "LambdaStream" in blocks[1]
    directory = save_tiny_model(tmp_path / "tiny")
    real_load_model = lm_infinite.models.load_model
    monkeypatch.setattr(lm_infinite.models, "load_model", lambda *args, **kwargs: real_load_model(directory))
    namespace = {"__name__": "readme"}
    for block in blocks:
        exec(compile(block, "README.md", "exec"), namespace)
    assert namespace["input_ids"].shape[1] == 10_000
    assert 10_000 < namespace["out"].shape[1] <= 10_000 + 20  # generate() may stop at <eos>
    assert namespace["stream"].position >= 10_000 + 29       # the last token may be yielded unfed
    assert capsys.readouterr().out.strip()


def test_the_two_commands_are_in_the_readme_and_ci_runs_the_second():
    """README's "Two commands": 1 installs (the serve extra too) and runs the demo, 2 installs the
    test extra and runs the suite; .ci/run runs command 2 word for word. Every install of the
    project turns build isolation off."""
    section = (ROOT / "README.md").read_text().split("## Two commands", 1)[1].split("\n## ", 1)[0]
    first, second = re.findall(r"^```bash\n(.*?)\n```", section, re.S | re.M)[:2]
    assert 'pip install --no-build-isolation -e ".[serve]"' in first and first.endswith("lminf demo")
    assert 'pip install --no-build-isolation -e ".[test]"' in second and second.endswith("python -m pytest -q tests")
    assert second in (ROOT / ".ci" / "run").read_text().splitlines()
    for doc in DOCS:
        for line in prose(doc.read_text()).splitlines() + FENCE.findall(doc.read_text()):
            for command in re.findall(r"pip install [^`\n]*", line):
                if re.search(r"(^|\s)(-e\s+\S+|\S*lm[-_]infinite\S*)", command.split("pip install", 1)[1]):
                    assert "--no-build-isolation" in command, f"{doc.name}: {command}"
