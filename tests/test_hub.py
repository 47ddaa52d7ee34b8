"""Adapters on the Hub, against ``tests/fake_hub.py`` (a Hub-compatible server on 127.0.0.1) with the real
``huggingface_hub`` client: push, pull into a fresh cache, identical predictions, revision pinning, tampering,
foreign base models, wrong tokens, offline mode, and the service's routes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from fake_hub import FakeHub
from prsmed.hub import HubError, HubRef, pull, push
from prsmed.infer import Predictor
from prsmed.infer.adapters import AdapterStore
from prsmed.model.bundle import BundleError, save_bundle
from prsmed.zoo import build_model
from samples import perturbed_bundle, png_bytes, scan

ALICE, BOB = "hf_alice_0123456789abcdef", "hf_bob_0123456789abcdef"


@pytest.fixture()
def hub():
    with FakeHub({ALICE: "alice", BOB: "bob"}) as h:
        yield h


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    root = tmp_path_factory.mktemp("bundles")
    perturbed_bundle(root / "v1", 1)
    perturbed_bundle(root / "v2", 2)
    return root


def test_ref_parsing():
    assert HubRef.parse("hf://alice/x@v2") == HubRef("alice/x", "v2")
    assert HubRef.parse("alice/x").store_name == "hf--alice--x--main"
    assert HubRef.parse("alice/x@feature/a").store_name == "hf--alice--x--feature_a"
    for bad in ("alice", "hf://../x", "alice/x@../../etc", "/abs/path"):
        with pytest.raises(ValueError):
            HubRef.parse(bad)


def test_push_then_pull_in_a_fresh_cache_predicts_identically(hub, bundles, tmp_path):
    out = push(bundles / "v1", "alice/tiny-adapter", token=ALICE, endpoint=hub.url)
    assert out["revision"] == "main" and len(out["commit"]) == 40
    card = hub.files("alice/tiny-adapter")["README.md"].decode()
    front = card.split("---")[1]
    assert "library_name: peft" in front and "base_model: prsmed-tiny" in front and "lora" in front
    assert "not for diagnosis" in card.lower() or "research" in card.lower()
    dest = pull("alice/tiny-adapter", tmp_path / "store" / "pulled", endpoint=hub.url, cache_dir=tmp_path / "cache")
    assert json.loads((dest / "hub_source.json").read_text())["commit"] == out["commit"]
    predictor = Predictor("prsmed-tiny")
    image = scan(3)
    here = predictor.predict(image, "Where is the lesion?", adapter=str(bundles / "v1"))
    there = predictor.predict(image, "Where is the lesion?", adapter=str(dest))
    base = predictor.predict(image, "Where is the lesion?")
    assert there.answer == here.answer and np.array_equal(there.mask, here.mask)
    assert np.allclose(there.probability, here.probability)
    assert not np.allclose(base.probability, here.probability)  # the adapter does change the prediction


def test_revisions_are_pinned(hub, bundles, tmp_path):
    first = push(bundles / "v1", "alice/pinned", token=ALICE, endpoint=hub.url)["commit"]
    push(bundles / "v2", "alice/pinned", revision="v2", token=ALICE, endpoint=hub.url)
    manifest = lambda d: json.loads((d / "adapter_manifest.json").read_text())["files"]  # noqa: E731
    main = pull("alice/pinned", tmp_path / "main", endpoint=hub.url, cache_dir=tmp_path / "c")
    v2 = pull("alice/pinned@v2", tmp_path / "v2", endpoint=hub.url, cache_dir=tmp_path / "c")
    sha = pull(f"alice/pinned@{first}", tmp_path / "sha", endpoint=hub.url, cache_dir=tmp_path / "c")
    assert manifest(main) == manifest(sha) == json.loads((bundles / "v1" / "adapter_manifest.json").read_text())["files"]
    assert manifest(v2) != manifest(main)
    # The store pulls a reference once and keeps it: a later push to the branch does not move it.
    store = AdapterStore(tmp_path / "store", hub_endpoint=hub.url)
    name = store.pull("hf://alice/pinned")
    push(bundles / "v2", "alice/pinned", token=ALICE, endpoint=hub.url)
    before = len(hub.requests)
    assert store.pull("hf://alice/pinned") == name and len(hub.requests) == before
    assert store.resolve("hf://alice/pinned")[1] == tmp_path / "store" / name
    assert manifest(tmp_path / "store" / name) == manifest(main)


def test_a_tampered_file_is_refused_and_nothing_is_installed(hub, bundles, tmp_path):
    push(bundles / "v1", "alice/tampered", token=ALICE, endpoint=hub.url)
    hub.tamper("alice/tampered", "fusion_head.safetensors", b"\0" * 64)
    with pytest.raises(BundleError, match="fusion_head.safetensors: SHA-256"):
        pull("alice/tampered", tmp_path / "dest", endpoint=hub.url, cache_dir=tmp_path / "c")
    assert not (tmp_path / "dest").exists() and not list(tmp_path.glob(".dest*"))


def test_an_adapter_for_another_base_model_is_refused(hub, tmp_path):
    model = build_model("prsmed-tiny")
    model.spec.prompt_template = "USER: <image>\n{question} ASSISTANT:"  # another base: another fingerprint
    save_bundle(model, tmp_path / "foreign")
    push(tmp_path / "foreign", "alice/foreign", token=ALICE, endpoint=hub.url)
    with pytest.raises(BundleError, match="fingerprint"):
        pull("alice/foreign", tmp_path / "dest", endpoint=hub.url, cache_dir=tmp_path / "c")
    with pytest.raises(BundleError, match="not 'prsmed-llava-med-7b'"):
        pull("alice/foreign", tmp_path / "dest", endpoint=hub.url, cache_dir=tmp_path / "c2",
             expect_model="prsmed-llava-med-7b")


def test_an_adapter_trained_on_other_base_weights_is_refused_unless_allowed(hub, old_bundle, tmp_path):
    out, old, _ = old_bundle
    push(out, "alice/old-weights", token=ALICE, endpoint=hub.url)
    with pytest.raises(BundleError, match=f"revision old \\(identity {old.identity[:12]}\\)"):
        pull("alice/old-weights", tmp_path / "dest", endpoint=hub.url, cache_dir=tmp_path / "c")
    assert not (tmp_path / "dest").exists()
    env = {**os.environ, "HF_ENDPOINT": hub.url, "HF_HOME": str(tmp_path / "hf")}
    refused = _cli(["pull", "alice/old-weights", "--to", str(tmp_path / "cli")], env, tmp_path)
    assert refused.returncode == 1 and "--allow-other-base-weights" in " ".join(refused.stderr.split())
    allowed = _cli(["pull", "alice/old-weights", "--to", str(tmp_path / "cli"), "--allow-other-base-weights"], env,
                   tmp_path)
    assert allowed.returncode == 0, allowed.stderr
    assert (tmp_path / "cli" / "adapter_manifest.json").is_file()


def test_wrong_tokens_and_private_repositories(hub, bundles, tmp_path):
    with pytest.raises(HubError) as wrong:
        push(bundles / "v1", "alice/secret", private=True, token="hf_wrong_token_xyz", endpoint=hub.url)
    assert wrong.value.status == 401 and "refused the token" in str(wrong.value)
    assert "hf_wrong_token_xyz" not in str(wrong.value)
    with pytest.raises(HubError) as foreign:
        push(bundles / "v1", "alice/secret", private=True, token=BOB, endpoint=hub.url)  # bob may not write there
    assert foreign.value.status == 401 and "HTTP 403" in str(foreign.value) and BOB not in str(foreign.value)
    push(bundles / "v1", "alice/secret", private=True, token=ALICE, endpoint=hub.url)
    with pytest.raises(HubError, match="private") as hidden:
        pull("alice/secret", tmp_path / "a", endpoint=hub.url, cache_dir=tmp_path / "c")
    assert hidden.value.status == 404
    assert pull("alice/secret", tmp_path / "b", token=ALICE, endpoint=hub.url, cache_dir=tmp_path / "c").is_dir()
    with pytest.raises(HubError, match="revision"):
        pull("alice/secret@nope", tmp_path / "d", token=ALICE, endpoint=hub.url, cache_dir=tmp_path / "c")


def _cli(args, env, cwd):
    return subprocess.run([sys.executable, "-m", "prsmed.cli", *args], capture_output=True, text=True, env=env,
                          cwd=cwd, timeout=300)


@pytest.mark.slow
def test_cli_push_pull_and_offline_mode(hub, bundles, tmp_path):
    env = {**os.environ, "HF_ENDPOINT": hub.url, "HF_TOKEN": ALICE, "HF_HOME": str(tmp_path / "hf")}
    env.pop("HF_HUB_OFFLINE", None)
    pushed = _cli(["push", str(bundles / "v1"), "alice/cli-adapter", "--private", "--commit-message", "first"], env,
                  tmp_path)
    assert pushed.returncode == 0, pushed.stderr
    assert ALICE not in pushed.stdout + pushed.stderr
    pulled = _cli(["pull", "alice/cli-adapter"], env, tmp_path)
    assert pulled.returncode == 0, pulled.stderr
    store = tmp_path / ".prsmed" / "adapters" / "hf--alice--cli-adapter--main"
    assert (store / "adapter_manifest.json").is_file()
    predicted = _cli(["predict", str(bundles / "v1" / "README.md"), "-q", "Where?"], env, tmp_path)
    assert predicted.returncode == 2  # (a README is not an image: the CLI says so, it does not crash)
    offline = {**env, "HF_HUB_OFFLINE": "1"}
    shutil.rmtree(store)
    again = _cli(["pull", "alice/cli-adapter"], offline, tmp_path)  # from the cache, without the server
    assert again.returncode == 0, again.stderr
    missing = _cli(["pull", "alice/never-pushed"], offline, tmp_path)
    assert missing.returncode == 1 and "HF_HUB_OFFLINE" in missing.stderr
    denied = _cli(["push", str(bundles / "v1"), "alice/cli-adapter"], {**env, "HF_TOKEN": "hf_not_valid_1234"},
                  tmp_path)
    assert denied.returncode == 1 and "refused the token" in denied.stderr and "hf_not_valid_1234" not in denied.stderr


@pytest.mark.slow
def test_service_pulls_pushes_and_predicts_with_hub_references(hub, bundles, tmp_path):
    from prsmed_sdk import Client, NotFound, Unauthorized
    from serving import start_server

    push(bundles / "v1", "alice/served", private=True, token=ALICE, endpoint=hub.url)
    srv = start_server(tmp_path / "data", "--grpc-port", "-1", env={"HF_ENDPOINT": hub.url, "HF_TOKEN": "",
                                                                    "HF_HOME": str(tmp_path / "hf")})
    try:
        with Client(srv.url) as c:
            with pytest.raises(NotFound, match="private"):
                c.predict(png_bytes(), "Where?", adapter="hf://alice/served")
            answer = c.predict(png_bytes(), "Where?", adapter="hf://alice/served", hf_token=ALICE)
            assert answer.adapter == "hf--alice--served--main"
            again = c.predict(png_bytes(), "Where?", adapter="hf://alice/served")  # now in the store: no token
            assert again.answer == answer.answer
            info = c.adapters.pull("alice/served@main", hf_token=ALICE)
            assert info.name == "hf--alice--served--main" and info.resident
            out = c.adapters.push("hf--alice--served--main", "alice/copy", private=True, hf_token=ALICE)
            assert out.repo_id == "alice/copy" and hub.files("alice/copy")["adapter_manifest.json"]
            with pytest.raises(Unauthorized, match="refused the token"):
                c.adapters.push("hf--alice--served--main", "alice/copy2", hf_token="hf_bad_token_987")
        from gradio_client import Client as GradioClient

        ui = GradioClient(srv.url + "/ui/", verbose=False)  # the demo's Adapters tab, same store
        message, table = ui.predict("alice/copy", ALICE, api_name="/pull_adapter")
        assert message.startswith("Pulled alice/copy as **hf--alice--copy--main**")
        assert "hf--alice--copy--main" in [row[0] for row in table["data"]]
        pushed = ui.predict("hf--alice--copy--main", "alice/copy3", True, ALICE, api_name="/push_adapter")
        assert pushed.startswith("Pushed hf--alice--copy--main to alice/copy3@main")
    finally:
        srv.stop()
    log = srv.log.read_text(errors="replace")
    assert ALICE not in log and "hf_bad_token_987" not in log
