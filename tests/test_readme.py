"""README.rst renders as reStructuredText with no warning: a broken table or literal would show
a newcomer raw markup (on PyPI, the page is the rendered README)."""

from __future__ import annotations

import io
from pathlib import Path

import docutils.core

README = Path(__file__).resolve().parents[1] / "README.rst"


def test_readme_renders_without_a_warning() -> None:
    messages = io.StringIO()
    docutils.core.publish_string(
        README.read_text(encoding="utf-8"),
        source_path=str(README),
        writer="null",
        settings_overrides={
            "report_level": 2,  # warnings and worse
            "halt_level": 5,  # never stop: collect them all
            "warning_stream": messages,
            "syntax_highlight": "none",  # code blocks need no Pygments
        },
    )
    assert messages.getvalue() == ""
