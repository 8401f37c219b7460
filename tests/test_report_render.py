"""Rendering safety without a browser: JSON placed in <script> elements, autoescaped templates."""

from __future__ import annotations

import json

from memprof.report.render import _environment, json_for_script


def test_json_for_script_cannot_close_the_element():
    fig = {"data": [{"name": "</script><script>alert(1)</script> & <!-- \u2028"}]}
    text = str(json_for_script(fig))
    assert "<" not in text and ">" not in text and "&" not in text and "\u2028" not in text
    assert json.loads(text) == fig  # still the same JSON for JSON.parse


def test_templates_autoescape():
    env = _environment()
    assert env.autoescape is True
    assert env.from_string("{{ x }}").render(x="<b>&") == "&lt;b&gt;&amp;"
