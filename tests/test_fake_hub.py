"""The fake Hub against the real huggingface_hub client: uploads, branches, private repos, tampering, HF_ENDPOINT."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from fake_hub import INVALID_CREDENTIALS, FakeHub
from huggingface_hub import HfApi, constants, hf_hub_download, snapshot_download
from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError

ALICE, BOB = "tok-alice", "tok-bob"


@pytest.fixture(autouse=True)
def isolated_client(monkeypatch, tmp_path):
    # A token saved on this machine or in the environment would otherwise be sent where a test means "no token".
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE", "HF_HUB_OFFLINE", "HF_ENDPOINT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "hf_home" / "token"))
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_TELEMETRY", True)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)


@pytest.fixture
def hub():
    with FakeHub({ALICE: "alice", BOB: "bob"}) as running:
        yield running


def write_folder(root: Path, files: dict[str, bytes]) -> Path:
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return root


def read_folder(root: str | Path) -> dict[str, bytes]:
    root = Path(root)
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def first_files() -> dict[str, bytes]:
    return {
        "config.json": json.dumps({"hidden": 8}).encode(),
        "sub/notes.txt": b"first version\n",
        "weights.bin": random.Random(0).randbytes(1 << 20),
    }


def download(hub: FakeHub, tmp_path: Path, repo_id: str, cache: str, **kwargs) -> dict[str, bytes]:
    kwargs.setdefault("token", False)
    return read_folder(snapshot_download(repo_id, cache_dir=tmp_path / cache, endpoint=hub.url, **kwargs))


def test_upload_folder_then_snapshot_download_gives_identical_bytes(hub, tmp_path):
    api = HfApi(endpoint=hub.url, token=ALICE)
    assert api.whoami()["name"] == "alice"
    repo_url = api.create_repo("alice/model", exist_ok=True)
    assert repo_url.repo_id == "alice/model"
    api.create_repo("alice/model", exist_ok=True)
    with pytest.raises(HfHubHTTPError) as exists:
        api.create_repo("alice/model")
    assert exists.value.response.status_code == 409

    files = first_files()
    info = api.upload_folder(repo_id="alice/model", folder_path=write_folder(tmp_path / "src", files))

    got = download(hub, tmp_path, "alice/model", "cache")
    assert set(got) == {".gitattributes", *files}
    assert {k: got[k] for k in files} == files
    assert hub.files("alice/model") == got
    model = api.model_info("alice/model")
    assert model.sha == info.oid
    assert sorted(s.rfilename for s in model.siblings) == sorted(got)
    # Everything went inline through preupload + commit and plain resolve GETs: no LFS batch, no Xet token.
    paths = [path for _, path in hub.requests]
    assert "/api/models/alice/model/preupload/main" in paths
    assert "/api/models/alice/model/commit/main" in paths
    assert not [p for p in paths if "xet" in p or "/info/lfs" in p or "lfs-files" in p]
    assert ("GET", f"/alice/model/resolve/{info.oid}/weights.bin") in hub.requests


def test_branch_commit_and_downloads_by_branch_and_commit_sha(hub, tmp_path):
    api = HfApi(endpoint=hub.url, token=ALICE)
    api.create_repo("alice/model")
    v1 = first_files()
    first = api.upload_folder(repo_id="alice/model", folder_path=write_folder(tmp_path / "v1", v1)).oid

    api.create_branch("alice/model", branch="v2")
    api.create_branch("alice/model", branch="v2", exist_ok=True)
    v2_local = {**v1, "config.json": b'{"hidden": 16}', "extra.txt": b"new in v2"}
    del v2_local["sub/notes.txt"]
    second = api.upload_folder(
        repo_id="alice/model",
        folder_path=write_folder(tmp_path / "v2", v2_local),
        revision="v2",
        delete_patterns="sub/*",
        commit_message="v2",
    ).oid
    assert second != first

    refs = api.list_repo_refs("alice/model")
    assert {b.name: b.target_commit for b in refs.branches} == {"main": first, "v2": second}

    gitattributes = hub.files("alice/model")[".gitattributes"]
    assert download(hub, tmp_path, "alice/model", "c_v2", revision="v2") == {
        ".gitattributes": gitattributes,
        **v2_local,
    }
    assert download(hub, tmp_path, "alice/model", "c_main", revision="main") == {".gitattributes": gitattributes, **v1}
    assert download(hub, tmp_path, "alice/model", "c_sha", revision=first) == {".gitattributes": gitattributes, **v1}
    # A full sha is used as is: no model_info call to resolve it.
    assert ("GET", f"/api/models/alice/model/revision/{first}") not in hub.requests

    one = hf_hub_download(
        "alice/model", "config.json", revision="v2", cache_dir=tmp_path / "c_one", endpoint=hub.url, token=False
    )
    assert Path(one).read_bytes() == b'{"hidden": 16}'
    assert api.model_info("alice/model", revision="v2").sha == second
    with pytest.raises(RevisionNotFoundError):
        download(hub, tmp_path, "alice/model", "c_bad", revision="v3")


def test_private_repo_needs_the_owners_token(hub, tmp_path):
    api = HfApi(endpoint=hub.url, token=ALICE)
    api.create_repo("alice/secret", private=True)
    files = {"weights.bin": b"\x00\x01private"}
    api.upload_folder(repo_id="alice/secret", folder_path=write_folder(tmp_path / "src", files))

    with pytest.raises(RepositoryNotFoundError):
        download(hub, tmp_path, "alice/secret", "anon")
    with pytest.raises(HfHubHTTPError) as wrong:
        download(hub, tmp_path, "alice/secret", "wrong", token="not-a-token")
    assert wrong.value.response.status_code == 401
    with pytest.raises(RepositoryNotFoundError):
        download(hub, tmp_path, "alice/secret", "bob", token=BOB)
    with pytest.raises(RepositoryNotFoundError):
        HfApi(endpoint=hub.url, token=BOB).model_info("alice/secret")
    assert download(hub, tmp_path, "alice/secret", "alice", token=ALICE)["weights.bin"] == files["weights.bin"]
    assert api.model_info("alice/secret").private is True


def test_writes_with_a_bad_token_or_another_namespace_are_refused(hub, tmp_path):
    with pytest.raises(HfHubHTTPError) as wrong:
        HfApi(endpoint=hub.url, token="not-a-token").create_repo("alice/other", exist_ok=True)
    assert wrong.value.response.status_code == 401
    assert INVALID_CREDENTIALS in str(wrong.value)
    with pytest.raises(HfHubHTTPError) as whoami:
        HfApi(endpoint=hub.url, token="not-a-token").whoami()
    assert "Invalid user token" in str(whoami.value)

    bob = HfApi(endpoint=hub.url, token=BOB)
    with pytest.raises(HfHubHTTPError) as foreign:
        bob.create_repo("alice/other")
    assert foreign.value.response.status_code == 403
    assert 'namespace "alice"' in str(foreign.value)
    assert "alice/other" not in hub.repos

    HfApi(endpoint=hub.url, token=ALICE).create_repo("alice/public")
    with pytest.raises(HfHubHTTPError) as push:
        bob.upload_folder(repo_id="alice/public", folder_path=write_folder(tmp_path / "src", {"a.txt": b"x"}))
    assert push.value.response.status_code == 403
    assert set(hub.files("alice/public")) == {".gitattributes"}


def test_tampered_file_is_served_under_the_same_commit(hub, tmp_path):
    api = HfApi(endpoint=hub.url, token=ALICE)
    api.create_repo("alice/model")
    files = first_files()
    sha = api.upload_folder(repo_id="alice/model", folder_path=write_folder(tmp_path / "src", files)).oid
    before = download(hub, tmp_path, "alice/model", "before")
    assert before["weights.bin"] == files["weights.bin"]

    hub.tamper("alice/model", "weights.bin", b"not the weights")
    with pytest.raises(KeyError):
        hub.tamper("alice/model", "missing.bin", b"")

    after_dir = snapshot_download("alice/model", cache_dir=tmp_path / "after", endpoint=hub.url, token=False)
    assert Path(after_dir).name == sha
    after = read_folder(after_dir)
    assert after == {**before, "weights.bin": b"not the weights"}
    assert api.model_info("alice/model").sha == sha
    # Only the server changed: the snapshot cached before the tampering keeps the original bytes.
    cached = tmp_path / "before" / "models--alice--model" / "snapshots" / sha / "weights.bin"
    assert cached.read_bytes() == files["weights.bin"]


def test_a_subprocess_finds_the_hub_through_HF_ENDPOINT(hub, tmp_path):
    api = HfApi(endpoint=hub.url, token=ALICE)
    api.create_repo("alice/secret", private=True)
    files = {"config.json": b"{}", "sub/w.bin": b"\x07" * 4096}
    sha = api.upload_folder(repo_id="alice/secret", folder_path=write_folder(tmp_path / "src", files)).oid

    script = textwrap.dedent(
        """
        import json, sys
        from huggingface_hub import HfApi, snapshot_download
        path = snapshot_download("alice/secret", cache_dir=sys.argv[1])
        print(json.dumps({"user": HfApi().whoami()["name"], "path": path}))
        """
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(HF_ENDPOINT=hub.url, HF_TOKEN=ALICE, HF_HOME=str(tmp_path / "hf_home"), HF_HUB_DISABLE_TELEMETRY="1")
    proc = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "cache")],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["user"] == "alice"
    assert Path(out["path"]).name == sha
    got = read_folder(out["path"])
    assert {k: got[k] for k in files} == files
