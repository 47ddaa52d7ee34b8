"""One name for one thing across the ``prsmed`` commands (docs/quickstart.md, "Option names")."""

from __future__ import annotations

import click
import typer

from prsmed import cli

# A name a command must not use for the thing on the right (an older name may stay as a second spelling).
SYNONYMS = {"--store": "--adapter-dir", "--adapters": "--adapter-dir", "--n": "--n-images", "--force": "--overwrite",
            "--output": "--out", "--dataset": "--data", "--data-dir-path": "--data", "--dst": "--to",
            "--batch": "--batch-size", "--output-json": "--json"}


def _commands():
    root = typer.main.get_command(cli.app)
    stack = [((), root, click.Context(root))]
    while stack:
        path, cmd, ctx = stack.pop()
        if hasattr(cmd, "list_commands"):
            if path:
                yield path, cmd
            for name in cmd.list_commands(ctx):
                sub = cmd.get_command(ctx, name)
                stack.append(((*path, name), sub, click.Context(sub, parent=ctx)))
        else:
            yield path, cmd


def test_every_command_uses_the_shared_option_names():
    found = []
    for path, cmd in _commands():
        for param in cmd.params:
            if param.param_type_name != "option" or not param.opts:
                continue
            primary = next((o for o in param.opts if o.startswith("--")), param.opts[0])
            if primary in SYNONYMS:
                found.append(f"prsmed {' '.join(path)} {primary} (use {SYNONYMS[primary]})")
    assert not found, found


def test_old_spellings_still_work(tmp_path):
    from typer.testing import CliRunner

    out = CliRunner().invoke(cli.app, ["data", "synth", str(tmp_path / "a"), "--n", "6", "--size", "32"])
    assert out.exit_code == 0, out.output
    out = CliRunner().invoke(cli.app, ["data", "synth", str(tmp_path / "b"), "--n-images", "6", "--size", "32"])
    assert out.exit_code == 0, out.output
    assert sorted(p.name for p in (tmp_path / "a").rglob("*")) == sorted(p.name for p in (tmp_path / "b").rglob("*"))
