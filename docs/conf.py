"""Sphinx configuration for the hl7bridge documentation.

Build with ``make docs`` (``sphinx-build -W`` into ``docs/_build/html``, with the
``docs`` extra installed); ``tests/test_docs.py`` builds them the same way. The pages
are reStructuredText, and Markdown read by MyST: ``docs/*.md`` (architecture,
reliability, performance) and ``migration.md``, which includes ``MIGRATION.md`` from
the root of the repository.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

# Document the package of this checkout, installed or not (its dependencies must be).
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import hl7bridge  # noqa: E402

project = "hl7bridge"
author = "hl7bridge maintainers"
copyright = "hl7bridge maintainers"  # noqa: A001
release = hl7bridge.__version__
version = ".".join(release.split(".")[:2])

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "myst_parser",
]

source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build"]

# MIGRATION.md links to its own sections by GitHub's anchors (#stage-0-...): give
# Markdown headings the same ones, down to the level those links use.
myst_heading_anchors = 3

# Docstrings are written in Google style (Args:, Returns:, Raises:).
napoleon_google_docstring = True
napoleon_numpy_docstring = False

# hl7bridge.testing is a pytest plugin and imports pytest, which the docs extra does
# not install: stand in for it when it is missing, so the API page still builds.
autodoc_mock_imports = [name for name in ("pytest",) if importlib.util.find_spec(name) is None]

autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_default_options = {
    "members": True,
    "show-inheritance": True,
}

html_theme = "alabaster"
html_title = f"hl7bridge {release}"
