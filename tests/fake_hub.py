"""An in-memory Hugging Face Hub for offline tests, served over HTTP on 127.0.0.1.

It speaks the subset of the Hub's HTTP API that ``huggingface_hub`` uses for: whoami, create_repo, create_branch,
list_repo_refs, model_info/repo_info, list_repo_tree, create_commit/upload_folder and hf_hub_download/
snapshot_download. Point the client at it with ``endpoint=hub.url`` or, in a subprocess, ``HF_ENDPOINT=hub.url``.

Every file is stored and served as a plain git blob: the preupload route answers "regular" for all files, so the
client sends contents inline (base64) in the commit and never starts an LFS or Xet transfer, and downloads carry no
Xet headers, so they are plain HTTP GETs on the resolve route.

Only model repos exist. Namespaces are user names; a token owns the namespace of the user it maps to.
"""

from __future__ import annotations

import base64
import hashlib
import itertools
import json
import re
import threading
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.message import Message
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Self
from urllib.parse import parse_qs, unquote, urlsplit

_COMMIT_SHA = re.compile(r"^[0-9a-f]{40}$")

# The Hub creates every repo with a .gitattributes commit; a short one keeps the first commit realistic.
_GITATTRIBUTES = b"".join(
    f"{pattern} filter=lfs diff=lfs merge=lfs -text\n".encode()
    for pattern in ("*.bin", "*.pt", "*.pth", "*.safetensors", "*.ckpt", "*.h5", "*.onnx", "*.zip", "*tfevents*")
)

INVALID_CREDENTIALS = "Invalid credentials in Authorization header"


def git_blob_sha(data: bytes) -> str:
    """The git object id of a blob: what the Hub reports as a regular file's oid and ETag."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.000Z")


@dataclass
class _Commit:
    files: dict[str, bytes]
    parent: str | None
    message: str
    description: str = ""
    date: str = field(default_factory=_now)


@dataclass
class _Repo:
    owner: str
    private: bool
    refs: dict[str, str] = field(default_factory=dict)
    commits: dict[str, _Commit] = field(default_factory=dict)
    created_at: str = field(default_factory=_now)


class HubError(Exception):
    """An error answer: status, JSON ``{"error": message, **body}`` and the Hub's X-Error-Code / X-Error-Message headers."""

    def __init__(
        self,
        status: int,
        message: str,
        code: str | None = None,
        headers: dict[str, str] | None = None,
        body: dict | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.headers = dict(headers or {})
        self.body = dict(body or {})


def _repo_not_found() -> HubError:
    # Same answer for a missing repo and for a private one the caller may not read, so that nothing leaks.
    return HubError(401, "Repository not found", "RepoNotFound")


class FakeHub:
    def __init__(self, tokens: dict[str, str] | None = None) -> None:
        self.tokens = dict(tokens or {})
        self.repos: dict[str, _Repo] = {}
        self.requests: list[tuple[str, str]] = []
        self.url = ""
        # Handler threads and the test thread touch the same store.
        self._lock = threading.RLock()
        self._counter = itertools.count()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> Self:
        if self._server is not None:
            return self
        server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        server.daemon_threads = True
        server.hub = self  # type: ignore[attr-defined]
        self._server = server
        self.url = f"http://127.0.0.1:{server.server_address[1]}"
        # A short poll interval keeps stop() quick; the default half second adds up over a test run.
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.05}, name="fake-hub", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._server = None
        self._thread = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ test helpers

    def tamper(self, repo_id: str, path: str, data: bytes, revision: str = "main") -> None:
        """Replace a file's bytes inside the commit ``revision`` points to, keeping that commit's sha.

        Size, ETag and tree oid then describe the new bytes, as they would on a server whose storage was altered.
        """
        with self._lock:
            repo = self.repos[repo_id]
            commit = repo.commits[self._resolve(repo, revision)]
            if path not in commit.files:
                raise KeyError(f"{path!r} is not in {repo_id}@{revision}")
            commit.files[path] = bytes(data)

    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        with self._lock:
            repo = self.repos[repo_id]
            return dict(repo.commits[self._resolve(repo, revision)].files)

    # ------------------------------------------------------------------ store

    def _new_commit(
        self, repo_id: str, repo: _Repo, files: dict[str, bytes], parent: str | None, message: str, description: str
    ) -> str:
        digest = hashlib.sha1()
        for part in (repo_id, parent or "", message, str(next(self._counter))):
            digest.update(part.encode() + b"\0")
        for path in sorted(files):
            digest.update(path.encode() + b"\0" + git_blob_sha(files[path]).encode())
        sha = digest.hexdigest()
        repo.commits[sha] = _Commit(files=dict(files), parent=parent, message=message, description=description)
        return sha

    @staticmethod
    def _resolve(repo: _Repo, revision: str) -> str:
        name = revision.removeprefix("refs/heads/")
        if name in repo.refs:
            return repo.refs[name]
        if _COMMIT_SHA.fullmatch(revision) and revision in repo.commits:
            return revision
        raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")

    def _user(self, authorization: str | None) -> str | None:
        """The caller's user name; None when anonymous. A token the hub does not know is refused outright."""
        if not authorization:
            return None
        scheme, _, token = authorization.partition(" ")
        user = self.tokens.get(token.strip()) if scheme.lower() == "bearer" else None
        if user is None:
            raise HubError(401, INVALID_CREDENTIALS)
        return user

    def _readable(self, repo_id: str, user: str | None) -> _Repo:
        repo = self.repos.get(repo_id)
        if repo is None or (repo.private and user != repo.owner):
            raise _repo_not_found()
        return repo

    def _writable(self, repo_id: str, user: str | None) -> _Repo:
        repo = self._readable(repo_id, user)
        if user is None:
            raise HubError(401, "You must be authenticated to write to this repository")
        if user != repo.owner:
            raise HubError(403, f"You don't have the rights to write to {repo_id}")
        return repo

    # ------------------------------------------------------------------ routes

    def handle(self, req: _Request) -> _Response:
        parts = req.parts
        with self._lock:
            user = self._user(req.headers.get("Authorization"))
            if parts[:1] == ["api"]:
                return self._api(req, parts[1:], user)
            if len(parts) >= 5 and parts[2] == "resolve" and req.method in ("GET", "HEAD"):
                return self._resolve_file(req, f"{parts[0]}/{parts[1]}", parts[3], "/".join(parts[4:]), user)
        raise HubError(404, f"No route for {req.method} {req.path}")

    def _api(self, req: _Request, parts: list[str], user: str | None) -> _Response:
        method = req.method
        if method == "GET" and parts == ["whoami-v2"]:
            return self._whoami(user)
        if method == "POST" and parts == ["repos", "create"]:
            return self._create_repo(req.json(), user)
        if method == "POST" and parts == ["validate-yaml"]:
            return _Response.json({"errors": [], "warnings": []})
        if len(parts) >= 3 and parts[0] in ("models", "datasets", "spaces"):
            if parts[0] != "models":
                raise HubError(404, "This fake hub only hosts model repos", "RepoNotFound")
            repo_id, rest = f"{parts[1]}/{parts[2]}", parts[3:]
            action = rest[0] if rest else None
            if method == "GET" and action is None:
                return self._model_info(repo_id, "main", req, user)
            if method == "GET" and action == "revision" and len(rest) == 2:
                return self._model_info(repo_id, rest[1], req, user)
            if method == "GET" and action == "refs" and len(rest) == 1:
                return self._list_refs(repo_id, user)
            if method == "GET" and action == "tree" and len(rest) >= 2:
                return self._tree(repo_id, rest[1], "/".join(rest[2:]), req, user)
            if method == "POST" and action == "branch" and len(rest) == 2:
                return self._create_branch(repo_id, rest[1], req.json(), user)
            if method == "POST" and action == "preupload" and len(rest) == 2:
                return self._preupload(repo_id, rest[1], req.json(), user)
            if method == "POST" and action == "commit" and len(rest) == 2:
                return self._commit(repo_id, rest[1], req, user)
        raise HubError(404, f"No route for {method} {req.path}")

    def _whoami(self, user: str | None) -> _Response:
        if user is None:
            raise HubError(401, INVALID_CREDENTIALS)
        return _Response.json(
            {
                "type": "user",
                "id": hashlib.sha1(user.encode()).hexdigest()[:24],
                "name": user,
                "fullname": user,
                "email": f"{user}@example.invalid",
                "emailVerified": True,
                "isPro": False,
                "orgs": [],
                "auth": {"type": "access_token", "accessToken": {"displayName": "fake-hub", "role": "write"}},
            }
        )

    def _create_repo(self, payload: dict, user: str | None) -> _Response:
        if user is None:
            raise HubError(401, "You must be authenticated to create a repository")
        if payload.get("type", "model") != "model":
            raise HubError(400, "This fake hub only hosts model repos")
        name = payload.get("name") or ""
        namespace = payload.get("organization") or user
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name):
            raise HubError(400, f"Invalid repo name: {name!r}")
        if namespace != user:
            raise HubError(403, f'You don\'t have the rights to create a model under the namespace "{namespace}"')
        repo_id = f"{namespace}/{name}"
        if repo_id in self.repos:
            # create_repo(exist_ok=True) reads the url out of the 409 answer.
            raise HubError(409, "You already created this model repo", body={"url": f"{self.url}/{repo_id}"})
        visibility = payload.get("visibility")
        private = visibility == "private" if visibility is not None else bool(payload.get("private", False))
        repo = _Repo(owner=user, private=private)
        repo.refs["main"] = self._new_commit(
            repo_id, repo, {".gitattributes": _GITATTRIBUTES}, None, "initial commit", ""
        )
        self.repos[repo_id] = repo
        return _Response.json({"url": f"{self.url}/{repo_id}", "name": repo_id, "id": repo_id})

    def _model_info(self, repo_id: str, revision: str, req: _Request, user: str | None) -> _Response:
        repo = self._readable(repo_id, user)
        sha = self._resolve(repo, revision)
        commit = repo.commits[sha]
        with_blobs = req.query.get("blobs", [""])[0].lower() in ("1", "true")
        siblings = []
        for path in sorted(commit.files):
            sibling: dict = {"rfilename": path}
            if with_blobs:
                sibling.update(size=len(commit.files[path]), blobId=git_blob_sha(commit.files[path]))
            siblings.append(sibling)
        return _Response.json(
            {
                "_id": hashlib.sha1(repo_id.encode()).hexdigest()[:24],
                "id": repo_id,
                "modelId": repo_id,
                "author": repo.owner,
                "sha": sha,
                "private": repo.private,
                "gated": False,
                "disabled": False,
                "downloads": 0,
                "likes": 0,
                "tags": [],
                "createdAt": repo.created_at,
                "lastModified": commit.date,
                "siblings": siblings,
            }
        )

    def _list_refs(self, repo_id: str, user: str | None) -> _Response:
        repo = self._readable(repo_id, user)
        branches = [
            {"name": name, "ref": f"refs/heads/{name}", "targetCommit": sha} for name, sha in sorted(repo.refs.items())
        ]
        return _Response.json({"branches": branches, "converts": [], "tags": [], "pullRequests": []})

    def _tree(self, repo_id: str, revision: str, prefix: str, req: _Request, user: str | None) -> _Response:
        repo = self._readable(repo_id, user)
        files = repo.commits[self._resolve(repo, revision)].files
        recursive = req.query.get("recursive", [""])[0].lower() in ("1", "true")
        base = prefix.strip("/")
        if base and base in files:
            raise HubError(400, f"{base} is a file, not a directory")
        base = f"{base}/" if base else ""
        below = [path for path in files if path.startswith(base)]
        if base and not below:
            raise HubError(404, f"{base.rstrip('/')} does not exist on {revision}", "EntryNotFound")
        folders: set[str] = set()
        entries = []
        for path in sorted(below):
            rest = path[len(base) :].split("/")
            # The Hub lists folders as entries of their own: every one when recursing, else the direct children.
            for depth in range(1, len(rest) if recursive else min(len(rest), 2)):
                folders.add(base + "/".join(rest[:depth]))
            if recursive or len(rest) == 1:
                data = files[path]
                entries.append({"type": "file", "oid": git_blob_sha(data), "size": len(data), "path": path})
        for folder in folders:
            tree_id = hashlib.sha1(f"tree\0{folder}".encode()).hexdigest()
            entries.append({"type": "directory", "oid": tree_id, "size": 0, "path": folder})
        entries.sort(key=lambda entry: entry["path"])
        return _Response.json(entries)

    def _create_branch(self, repo_id: str, branch: str, payload: dict, user: str | None) -> _Response:
        repo = self._writable(repo_id, user)
        if branch in repo.refs:
            raise HubError(409, f"Reference refs/heads/{branch} already exists")
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._/-]*", branch) or _COMMIT_SHA.fullmatch(branch):
            raise HubError(400, f"Invalid branch name: {branch!r}")
        repo.refs[branch] = self._resolve(repo, payload.get("startingPoint") or "main")
        return _Response.json({})

    def _preupload(self, repo_id: str, revision: str, payload: dict, user: str | None) -> _Response:
        repo = self._writable(repo_id, user)
        files = repo.commits[self._resolve(repo, revision)].files
        answers = []
        for entry in payload.get("files", []):
            path = entry["path"]
            existing = files.get(path)
            # "regular" for every file keeps the client off LFS and Xet: contents come inline in the commit.
            # The oid of the file already there lets the client drop unchanged files, as with the Hub.
            answers.append(
                {
                    "path": path,
                    "uploadMode": "regular",
                    "shouldIgnore": False,
                    "oid": git_blob_sha(existing) if existing is not None else None,
                }
            )
        return _Response.json({"files": answers})

    def _commit(self, repo_id: str, revision: str, req: _Request, user: str | None) -> _Response:
        repo = self._writable(repo_id, user)
        if req.query.get("create_pr", ["0"])[0] not in ("0", ""):
            raise HubError(400, "This fake hub does not support pull requests")
        branch = revision.removeprefix("refs/heads/")
        if branch not in repo.refs:
            # An unknown revision must still surface as RevisionNotFound; only a known non-branch is a 400.
            self._resolve(repo, revision)
            raise HubError(400, f"Can only commit to a branch, not to {revision}")
        head = repo.refs[branch]
        files = dict(repo.commits[head].files)
        summary, description = "", ""
        for lineno, line in enumerate(req.body.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
                key, value = item["key"], item["value"]
            except (ValueError, KeyError, TypeError):
                raise HubError(400, f"Malformed commit payload at line {lineno}") from None
            if key == "header":
                summary = value.get("summary") or ""
                description = value.get("description") or ""
                parent = value.get("parentCommit")
                if parent and not head.startswith(parent):
                    raise HubError(412, "A commit has happened since. Please refresh and try again.")
            elif key == "file":
                if value.get("encoding", "base64") != "base64":
                    raise HubError(400, f"Unsupported encoding {value.get('encoding')!r}")
                files[value["path"]] = base64.b64decode(value["content"])
            elif key == "deletedFile":
                if value["path"] not in files:
                    raise HubError(404, "A file with this name doesn't exist", "EntryNotFound")
                del files[value["path"]]
            elif key == "deletedFolder":
                folder = value["path"].rstrip("/") + "/"
                doomed = [path for path in files if path.startswith(folder)]
                if not doomed:
                    raise HubError(404, "A folder with this name doesn't exist", "EntryNotFound")
                for path in doomed:
                    del files[path]
            elif key == "lfsFile":
                raise HubError(400, "This fake hub stores every file inline; LFS pointers are not accepted")
            else:
                raise HubError(400, f"Unknown commit operation {key!r}")
        if not summary:
            raise HubError(400, "The commit summary is required")
        sha = self._new_commit(repo_id, repo, files, head, summary, description)
        repo.refs[branch] = sha
        return _Response.json(
            {
                "success": True,
                "commitOid": sha,
                "commitUrl": f"{self.url}/{repo_id}/commit/{sha}",
                "hookOutput": "",
                "pullRequestUrl": None,
            }
        )

    def _resolve_file(self, req: _Request, repo_id: str, revision: str, path: str, user: str | None) -> _Response:
        repo = self._readable(repo_id, user)
        sha = self._resolve(repo, revision)
        files = repo.commits[sha].files
        if path not in files:
            # The commit header lets the client remember that the file is missing at this commit.
            raise HubError(404, "Entry not found", "EntryNotFound", headers={"X-Repo-Commit": sha})
        data = files[path]
        headers = {
            "X-Repo-Commit": sha,
            "ETag": f'"{git_blob_sha(data)}"',
            "Accept-Ranges": "bytes",
            "Content-Type": "application/octet-stream",
            "Content-Disposition": f'inline; filename="{path.rsplit("/", 1)[-1]}"',
        }
        status = 200
        # http_get resumes an interrupted download with "Range: bytes=N-".
        match = re.fullmatch(r"bytes=(\d+)-(\d*)", req.headers.get("Range") or "")
        if match and int(match.group(1)) < len(data):
            start = int(match.group(1))
            end = min(int(match.group(2)), len(data) - 1) if match.group(2) else len(data) - 1
            headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
            data, status = data[start : end + 1], 206
        return _Response(status, data, headers)


# ---------------------------------------------------------------------- HTTP plumbing


@dataclass
class _Request:
    method: str
    path: str
    query: dict[str, list[str]]
    headers: Message  # case-insensitive, as HTTP header names are
    body: bytes

    @property
    def parts(self) -> list[str]:
        # Split before unquoting: the client quotes revisions with safe="", so "refs%2Fpr%2F1" stays one segment.
        return [unquote(part) for part in self.path.strip("/").split("/")] if self.path.strip("/") else []

    def json(self) -> dict:
        if not self.body:
            return {}
        try:
            data = json.loads(self.body)
        except ValueError:
            raise HubError(400, "Request body is not valid JSON") from None
        if not isinstance(data, dict):
            raise HubError(400, "Request body must be a JSON object")
        return data


@dataclass
class _Response:
    status: int
    body: bytes
    headers: dict[str, str]

    @classmethod
    def json(cls, data: object, status: int = 200) -> _Response:
        return cls(status, json.dumps(data).encode(), {"Content-Type": "application/json; charset=utf-8"})


class _Handler(BaseHTTPRequestHandler):
    # Keep-alive, as the client pools connections; every answer therefore carries a Content-Length.
    protocol_version = "HTTP/1.1"
    server_version = "FakeHub/1.0"

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        self._dispatch()

    def do_HEAD(self) -> None:
        self._dispatch()

    def do_POST(self) -> None:
        self._dispatch()

    def do_PUT(self) -> None:
        self._dispatch()

    def do_DELETE(self) -> None:
        self._dispatch()

    def _read_body(self) -> bytes:
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _dispatch(self) -> None:
        hub: FakeHub = self.server.hub  # type: ignore[attr-defined]
        split = urlsplit(self.path)
        hub.requests.append((self.command, split.path))
        request = _Request(
            method=self.command,
            path=split.path,
            query=parse_qs(split.query),
            headers=self.headers,
            body=self._read_body(),
        )
        try:
            response = hub.handle(request)
        except HubError as err:
            # The client builds its exception from these headers; the body is for anything else that reads it.
            response = _Response.json({"error": err.message, **err.body}, status=err.status)
            response.headers["X-Error-Message"] = err.message
            if err.code:
                response.headers["X-Error-Code"] = err.code
            response.headers.update(err.headers)
        except Exception as err:  # noqa: BLE001 - a bug in the fake should fail the test with its cause
            response = _Response.json({"error": f"fake hub crashed: {err!r}"}, status=500)
        self.send_response(response.status)
        for key, value in response.headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(response.body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(response.body)
