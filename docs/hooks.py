"""MkDocs hooks (``hooks:`` in mkdocs.yml): the OpenAPI reference, and the repository's other pages.

- ``openapi.json`` and ``openapi.md`` are generated at build time from ``app.main.create_app()``'s
  ``openapi()``: the schema the running server serves at ``/openapi.json``, rendered as a Markdown
  reference of paths, methods and request/response schemas (no JavaScript, nothing fetched).
  Building the app loads no model (the lifespan does, and it never runs here).
- The pages under ``docs/`` link to files elsewhere in the repository (``../deploy/README.md``,
  ``../benchmarks/RESULTS.md``) with paths that work on GitHub. Those files are brought into the site
  under the same repository path (Markdown as pages, anything else as a static file) and each such
  link is rewritten to where the file lands, so ``mkdocs build --strict`` still checks every link:
  a link to a file that exists nowhere stays as written and fails the build, and a Markdown file
  brought in must be in the nav like every page.
"""

from __future__ import annotations

import json
import os
import posixpath
import re
import sys
from pathlib import Path

from mkdocs.structure.files import File, Files

ROOT = Path(__file__).resolve().parents[1]
DOCS = "docs"
LINK = re.compile(r"(\]\()([^)\s]+)(\))")
FENCE = re.compile(r"^\s*(```|~~~)")


def _outside_code(markdown: str, fn) -> str:
    """``fn`` applied to the lines of ``markdown`` that are not inside fenced code blocks."""
    out, fenced = [], False
    for line in markdown.splitlines(keepends=True):
        if FENCE.match(line):
            fenced = not fenced
            out.append(line)
        else:
            out.append(line if fenced else fn(line))
    return "".join(out)


def links(markdown: str) -> list[str]:
    """The targets of the Markdown links and images of ``markdown``, outside code blocks."""
    found: list[str] = []
    _outside_code(markdown, lambda line: found.extend(m.group(2) for m in LINK.finditer(line)) or line)
    return found


def is_relative(target: str) -> bool:
    """Whether ``target`` is a relative path (not an anchor, an absolute path or a URL)."""
    return not (target.startswith(("#", "/")) or re.match(r"^[a-z][a-z0-9+.-]*:", target))


def _repo_path(src_uri: str, imported: set[str]) -> str:
    """Where the page ``src_uri`` of the site lives in the repository."""
    return src_uri if src_uri in imported else posixpath.join(DOCS, src_uri)


def _site_path(repo_path: str) -> str:
    """Where the repository file ``repo_path`` lands in the site."""
    prefix = DOCS + "/"
    return repo_path[len(prefix):] if repo_path.startswith(prefix) else repo_path


def _target(page_repo_path: str, link: str) -> tuple[str, str]:
    """(the repository path a relative link points at, its #fragment or '')."""
    path, _, frag = link.partition("#")
    return posixpath.normpath(posixpath.join(posixpath.dirname(page_repo_path), path)), frag


def _schema_without_tfb_env() -> dict:
    """The app's OpenAPI schema, built with the default settings whatever TFB_* this shell has."""
    if str(ROOT) not in sys.path:  # mkdocs run from elsewhere: the app is this tree's
        sys.path.insert(0, str(ROOT))
    from app.main import create_app

    saved = {k: os.environ.pop(k) for k in list(os.environ) if k.startswith("TFB_")}
    try:
        return create_app().openapi()
    finally:
        os.environ.update(saved)


# --- the OpenAPI schema as Markdown ----------------------------------------------------------------

def _cell(text: object) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def _grouped(text: str) -> str:
    return f"({text})" if " or " in text else text


def _number(v: object) -> str:
    """A bound as written (pydantic gives ``ge=1`` as 1.0, the largest int64 as a float)."""
    if isinstance(v, float) and v.is_integer():
        return str(2**63 - 1) if v == 2.0**63 else str(int(v))
    return str(v)


def _type(s: dict) -> str:
    """A readable type of a JSON schema, with links to the named schemas."""
    if "$ref" in s:
        name = s["$ref"].rsplit("/", 1)[-1]
        return f"[{name}](#{name.lower()})"
    if "anyOf" in s or "oneOf" in s:
        return " or ".join(_type(x) for x in s.get("anyOf", s.get("oneOf")))
    if "const" in s:
        return f"`{json.dumps(s['const'])}`"
    if "enum" in s:
        return " \\| ".join(f"`{json.dumps(v)}`" for v in s["enum"])
    t = s.get("type")
    if t == "array":
        return f"array of {_grouped(_type(s.get('items', {})))}"
    if t == "object" and isinstance(s.get("additionalProperties"), dict):
        return f"object of {_grouped(_type(s['additionalProperties']))}"
    bounds = [f"{k} {_number(s[k])}" for k in ("minimum", "exclusiveMinimum", "maximum", "exclusiveMaximum",
                                      "minLength", "maxLength", "minItems", "maxItems") if k in s]
    return (t or "any") + (f" ({', '.join(bounds)})" if bounds else "")


def _body_schema(content: dict) -> str:
    return "; ".join(f"`{ct}`: {_type(c.get('schema', {}))}" for ct, c in content.items()) or "–"


def openapi_markdown(schema: dict) -> str:
    """A Markdown reference of ``schema`` (an OpenAPI 3 document): paths, then the named schemas."""
    info = schema.get("info", {})
    lines = ["# OpenAPI reference", "",
             f"{info.get('title', '')} {info.get('version', '')}: {_cell(info.get('description', ''))}", "",
             "Generated from the app (`app.main.create_app().openapi()`) when this site is built; the running "
             "server serves the same document at `/openapi.json` and renders it at `/docs` and `/redoc`. "
             "The raw schema: [openapi.json](openapi.json). What the fields mean and how each route behaves: "
             "[API](api.md), [Bayesian generation](generation.md), [Deployment](deployment.md).", "",
             "## Paths", ""]
    for path, ops in schema.get("paths", {}).items():
        for method, op in ops.items():
            lines += [f"### `{method.upper()} {path}`", ""]
            if op.get("summary"):
                lines += [f"**{_cell(op['summary'])}**", ""]
            if op.get("description"):
                lines += [op["description"].strip(), ""]
            params = op.get("parameters", [])
            if params:
                lines += ["| parameter | in | type | required |", "|---|---|---|---|"]
                lines += [f"| `{p['name']}` | {p.get('in', '')} | {_type(p.get('schema', {}))} | "
                          f"{'yes' if p.get('required') else 'no'} |" for p in params]
                lines.append("")
            body = op.get("requestBody")
            if body:
                lines += [f"Request body{' (required)' if body.get('required') else ''}: "
                          f"{_body_schema(body.get('content', {}))}", ""]
            lines += ["| status | description | body |", "|---|---|---|"]
            lines += [f"| {code} | {_cell(r.get('description', ''))} | {_body_schema(r.get('content', {}))} |"
                      for code, r in op.get("responses", {}).items()]
            lines.append("")
    lines += ["## Schemas", ""]
    for name, s in schema.get("components", {}).get("schemas", {}).items():
        lines += [f"### {name}", ""]
        if s.get("description"):
            lines += [_cell(s["description"]), ""]
        props = s.get("properties", {})
        if props:
            required = set(s.get("required", []))
            lines += ["| field | type | required | default | description |", "|---|---|---|---|---|"]
            for field, p in props.items():
                default = f"`{json.dumps(p['default'])}`" if "default" in p else ""
                lines.append(f"| `{field}` | {_type(p)} | {'yes' if field in required else 'no'} | {_cell(default)} | "
                             f"{_cell(p.get('description', ''))} |")
        else:
            lines.append(f"Type: {_type(s)}")
        lines.append("")
    return "\n".join(lines)


# --- hooks -----------------------------------------------------------------------------------------

def on_files(files: Files, config) -> Files:
    """Add the generated OpenAPI pages and the repository files the pages link to."""
    schema = _schema_without_tfb_env()
    files.append(File.generated(config, "openapi.json", content=json.dumps(schema, indent=2) + "\n"))
    files.append(File.generated(config, "openapi.md", content=openapi_markdown(schema)))

    imported: set[str] = set()
    todo = [(f.src_uri, Path(f.abs_src_path).read_text(encoding="utf-8")) for f in files.documentation_pages()
            if f.abs_src_path]
    while todo:
        src_uri, text = todo.pop()
        page = _repo_path(src_uri, imported)
        for link in filter(is_relative, links(text)):
            repo_path, _ = _target(page, link)
            if repo_path.startswith(DOCS + "/") or repo_path in imported or not (ROOT / repo_path).is_file():
                continue  # a page of docs/, already brought in, or missing (mkdocs reports the broken link)
            imported.add(repo_path)
            files.append(File.generated(config, repo_path, abs_src_path=str(ROOT / repo_path)))
            if repo_path.endswith(".md"):
                todo.append((repo_path, (ROOT / repo_path).read_text(encoding="utf-8")))
    config["tfb_imported"] = imported
    return files


def on_page_markdown(markdown: str, page, config, files: Files) -> str:
    """Point every link at where its target lands in the site (a no-op for links within docs/)."""
    imported = config.get("tfb_imported", set())
    here = page.file.src_uri
    repo_here = _repo_path(here, imported)

    def fix(m: re.Match) -> str:
        link = m.group(2)
        if not is_relative(link):
            return m.group(0)
        repo_path, frag = _target(repo_here, link)
        site = _site_path(repo_path)
        if files.get_file_from_path(site) is None:
            return m.group(0)  # mkdocs reports it
        new = posixpath.relpath(site, posixpath.dirname(here) or ".") + (f"#{frag}" if frag else "")
        return m.group(1) + new + m.group(3)

    return _outside_code(markdown, lambda line: LINK.sub(fix, line))
