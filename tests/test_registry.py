"""The pluggy registry: built-ins through entry points, a real third-party distribution, errors that help."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import prsmed
from prsmed.components import ComponentError, ComponentSpec, VisionEncoderContract
from prsmed.registry import Registry

FIXTURE = Path(__file__).parent / "fixtures" / "thirdparty_plugin"


@pytest.fixture(scope="module")
def plugin_site(tmp_path_factory) -> Path:
    """The toy plugin distribution, really installed (pip, entry points and all) into a private directory."""
    src = tmp_path_factory.mktemp("src") / "toy"
    shutil.copytree(FIXTURE, src)
    target = tmp_path_factory.mktemp("site")
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation", "--no-index",
         "--target", str(target), str(src)],
        check=True,
    )
    return target


def run_py(code: str, *, site: Path | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if k != "PRSMED_PLUGINS"}
    if site is not None:
        full_env["PYTHONPATH"] = str(site)
    full_env.update(env or {})
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=full_env)


def test_builtins_are_registered_through_entry_points():
    names = {(s.kind, s.name) for s in prsmed.list_components()}
    for expected in [
        ("vision_encoder", "tinysam"),
        ("vision_encoder", "sam-vit"),
        ("llm", "llava"),
        ("llm", "hf-causal-lm"),
        ("fusion_head", "prsmed"),
        ("fusion_head", "two-way"),
    ]:
        assert expected in names
    plugins = {p.name: p for p in prsmed.registry.get_registry().plugins()}
    assert {"vision-encoders", "llms", "fusion-heads"} <= set(plugins)
    assert all(plugins[n].builtin and plugins[n].distribution == "prsmed" for n in ("vision-encoders", "llms"))


def test_third_party_distribution_is_discovered_and_usable(plugin_site):
    proc = run_py(
        """
        import json, torch, prsmed
        enc = prsmed.create_component("vision_encoder", "toy-conv", input_size=64, out_channels=8)
        out = enc(torch.zeros(2, 3, 64, 64))
        info = [p for p in prsmed.registry.get_registry().plugins() if p.name == "toy"][0]
        print(json.dumps({"shape": list(out.shape), "version": info.version, "dist": info.distribution,
                          "builtin": info.builtin, "components": info.components}))
        """,
        site=plugin_site,
    )
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout)
    assert got == {"shape": [2, 8, 4, 4], "version": "1.2.3", "dist": "prsmed-toy-plugin", "builtin": False,
                   "components": ["vision_encoder/toy-conv"]}


def test_cli_lists_plugins_as_json(plugin_site):
    proc = run_py("from prsmed.cli import main; import sys; sys.argv=['prsmed','plugins','list','--json']; main()",
                  site=plugin_site)
    assert proc.returncode == 0, proc.stderr
    rows = {r["name"]: r for r in json.loads(proc.stdout)}
    assert rows["toy"]["version"] == "1.2.3" and rows["toy"]["distribution"] == "prsmed-toy-plugin"
    assert "fusion_head/prsmed" in rows["fusion-heads"]["components"]


def test_allow_list_restricts_third_party_plugins(plugin_site):
    code = "import prsmed; print(sorted(s.name for s in prsmed.list_components('vision_encoder')))"
    only_builtins = run_py(code, site=plugin_site, env={"PRSMED_PLUGINS": ""})
    assert only_builtins.returncode == 0, only_builtins.stderr
    assert "toy-conv" not in only_builtins.stdout and "tinysam" in only_builtins.stdout
    allowed = run_py(code, site=plugin_site, env={"PRSMED_PLUGINS": "toy,other"})
    assert "toy-conv" in allowed.stdout


def _spec(name: str, kind: str = "vision_encoder") -> ComponentSpec:
    return ComponentSpec(
        kind=kind,
        name=name,
        build=lambda **o: torch.nn.Identity(),
        contract=lambda **o: VisionEncoderContract(input_size=32, out_channels=4),
    )


class _Plugin:
    def __init__(self, *specs):
        self.specs = specs

    @prsmed.hookimpl
    def prsmed_register_components(self, register):
        for s in self.specs:
            register(s)


def test_duplicate_registration_names_both_plugins():
    reg = Registry()
    reg._loaded = True  # no entry points: only what this test registers
    reg.register_plugin(_Plugin(_spec("dup")), name="first")
    with pytest.raises(ComponentError) as e:
        reg.register_plugin(_Plugin(_spec("dup")), name="second")
    assert "'first'" in str(e.value) and "'second'" in str(e.value) and "vision_encoder/dup" in str(e.value)
    # the failed plugin left nothing behind
    assert [p.name for p in reg.plugins()] == ["first"]


def test_unknown_name_lists_known_ones_closest_first():
    with pytest.raises(ComponentError) as e:
        prsmed.create_component("vision_encoder", "tinysan")
    msg = str(e.value)
    assert "unknown vision_encoder 'tinysan'" in msg
    assert msg.index("tinysam") < msg.index("sam-vit")
    with pytest.raises(ComponentError, match="known kinds"):
        prsmed.list_components("decoder")


def test_non_module_build_is_refused():
    reg = Registry()
    reg._loaded = True
    bad = ComponentSpec(kind="fusion_head", name="bad", build=lambda **o: object(), contract=lambda **o: None)
    reg.register_plugin(_Plugin(bad), name="badplugin")
    with pytest.raises(ComponentError, match="not a torch.nn.Module"):
        reg.create("fusion_head", "bad")
