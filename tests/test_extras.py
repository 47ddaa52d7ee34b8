"""The web stack is optional: a command that needs a missing extra names it, and the core never imports it."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

from typer.testing import CliRunner

from prsmed import extras
from prsmed.cli import app


def _without(monkeypatch, *names):
    real = importlib.util.find_spec

    def find_spec(name, *args, **kwargs):
        if name.split(".")[0] in names:
            return None
        return real(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)


def test_serve_names_the_extra_it_lacks(monkeypatch):
    _without(monkeypatch, "bentoml")
    result = CliRunner().invoke(app, ["serve"])
    assert result.exit_code == 2
    assert "pip install 'prsmed[serve]'" in result.output and "bentoml is not installed" in result.output


def test_demo_names_the_extra_it_lacks(monkeypatch):
    _without(monkeypatch, "gradio", "pandas")
    result = CliRunner().invoke(app, ["demo"])
    assert result.exit_code == 2
    assert "pip install 'prsmed[demo]'" in result.output and "gradio, pandas are not installed" in result.output


def test_installed_extras_are_found():
    assert extras.missing("serve") == [] and extras.missing("demo") == []


def test_the_library_trainer_and_planner_load_without_the_web_stack():
    """Importing the core's modules pulls in none of the service's or the demo's packages."""
    code = (
        "import sys\n"
        "import prsmed, prsmed.cli, prsmed.train.trainer, prsmed.plan.estimate, prsmed.infer, prsmed.zoo\n"
        "from prsmed.zoo import build_model\n"
        "build_model('prsmed-tiny')\n"
        "heavy = sorted(m for m in ('bentoml', 'fastapi', 'gradio', 'grpc', 'pandas') if m in sys.modules)\n"
        "print(heavy)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "[]"
