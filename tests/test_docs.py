"""The documentation: the site builds in strict mode (every link, anchor and page checked, the OpenAPI
reference generated from the app), strict mode does catch what it is there for, and the README stays a
page a newcomer reads in five minutes, opening with the two commands."""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import require

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
#: the README is the five-minute page; the reference lives under docs/ (issue 30)
README_MAX_LINES = 150
COMMANDS = ["bash scripts/serve.sh", "bash scripts/test.sh"]


@pytest.fixture(scope="module")
def hooks():
    """docs/hooks.py, the site's hooks (its link reader is the one the README check uses)."""
    require("mkdocs", "mkdocs is not installed (extra docs)")
    spec = importlib.util.spec_from_file_location("tfb_docs_hooks", ROOT / "docs" / "hooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_site_builds_strict_with_the_openapi_reference_of_the_app(tmp_path, hooks):
    site = tmp_path / "site"
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    r = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(ROOT / "mkdocs.yml"),
                        "-d", str(site)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    from app.main import create_app

    schema = create_app().openapi()
    assert json.loads((site / "openapi.json").read_text()) == schema
    reference = (site / "openapi" / "index.html").read_text()
    for path, ops in schema["paths"].items():
        for method in ops:
            assert f"{method.upper()} {path}" in reference, f"{method} {path} missing from the OpenAPI page"
    # the repository pages the docs link to are part of the site, their links pointed at them
    assert (site / "deploy" / "index.html").is_file() and (site / "benchmarks" / "RESULTS" / "index.html").is_file()
    assert 'href="../benchmarks/RESULTS/"' in (site / "performance" / "index.html").read_text()


def test_strict_build_fails_on_a_broken_link_anchor_repo_file_or_a_page_outside_the_nav(tmp_path, caplog, hooks):
    from mkdocs.commands.build import build
    from mkdocs.config import load_config
    from mkdocs.exceptions import Abort

    docs = tmp_path / "docs"
    shutil.copytree(ROOT / "docs", docs, ignore=shutil.ignore_patterns("__pycache__"))
    (docs / "orphan.md").write_text("# Orphan\n\nA page with nothing wrong but that the nav leaves out.\n")
    (docs / "stray.md").write_text("# Stray\n\n[a](nowhere.md), [b](api.md#no-such-anchor), [c](../no-such-file.md), "
                                   "[d](api.md#vllm-compatible-classify), [e](../deploy/README.md#building-images)\n")
    config = load_config(str(ROOT / "mkdocs.yml"), docs_dir=str(docs), site_dir=str(tmp_path / "site"))
    with caplog.at_level(logging.WARNING, logger="mkdocs"), pytest.raises(Abort):
        build(config)
    warned = "\n".join(r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING)
    for broken in ("orphan.md", "nowhere.md", "no-such-anchor", "no-such-file.md"):
        assert broken in warned, f"strict mode let {broken} through:\n{warned}"
    for fine in ("vllm-compatible-classify", "building-images"):  # anchors that exist, here and in deploy/
        assert fine not in warned, warned


def test_readme_is_short_and_opens_with_the_two_commands():
    text = README.read_text()
    lines = text.splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines: the reference belongs under docs/"
    body = [line for line in lines[1:] if line.strip()]  # after the title
    assert body[0] == "```sh", "the README opens with the commands"
    commands = [line.split("#", 1)[0].strip() for line in body[1:body.index("```", 1)]]
    assert commands == COMMANDS


def test_readme_links_point_at_files_and_site_pages(hooks):
    nav_pages = set(re.findall(r":\s*(\S+\.md)\s*$", (ROOT / "mkdocs.yml").read_text(), re.M))
    for link in filter(hooks.is_relative, hooks.links(README.read_text())):
        path = link.partition("#")[0]
        assert (ROOT / path).exists(), f"README links to {link}: no such file"
        if path.startswith("docs/") and path.endswith(".md"):
            assert path[len("docs/"):] in nav_pages, f"README links to {path}, a page not in mkdocs.yml's nav"
