"""A local, in-memory stand-in for the Hugging Face Hub, for tests of real `huggingface_hub` upload and download calls.

It speaks the subset of the Hub HTTP API that `huggingface_hub` 2.4 uses for `whoami`, `create_repo`, `upload_folder`
(validate-yaml, preupload, commit), `repo_info`, `list_repo_tree` (no pagination), and `hf_hub_download` / `file_exists` (HEAD and GET on
``/{repo_id}/resolve/{revision}/{filename}``), with the response headers the client relies on (``X-Repo-Commit``,
``ETag``, ``Content-Length``, ``X-Error-Code``). It binds 127.0.0.1 only.

The preupload answer routes every file to the "regular" (base64 in the commit payload) upload mode. The real Hub
sends large or binary files to LFS/Xet storage instead; the client only takes that path when the server says so, so
this server never needs a storage backend. An ``lfsFile`` line in a commit is refused with a 400, which would show
if a client ever took that route anyway.

Private repos behave like the Hub's: without a known token a read gets 401 with ``X-Error-Code: RepoNotFound``.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Optional
from urllib.parse import unquote, urlsplit

import yaml

_REPO = r"(?P<repo>[^/]+/[^/]+)"
_ROUTES = [
    ("GET", re.compile(r"^/api/whoami-v2$"), "whoami"),
    ("POST", re.compile(r"^/api/repos/create$"), "create_repo"),
    ("POST", re.compile(r"^/api/validate-yaml$"), "validate_yaml"),
    ("POST", re.compile(rf"^/api/models/{_REPO}/preupload/(?P<rev>[^/]+)$"), "preupload"),
    ("POST", re.compile(rf"^/api/models/{_REPO}/commit/(?P<rev>[^/]+)$"), "commit"),
    ("GET", re.compile(rf"^/api/models/{_REPO}(?:/revision/(?P<rev>[^/]+))?$"), "repo_info"),
    ("GET", re.compile(rf"^/api/models/{_REPO}/tree/(?P<rev>[^/]+)(?:/(?P<dir>.+))?$"), "tree"),
    ("GET", re.compile(rf"^/{_REPO}/resolve/(?P<rev>[^/]+)/(?P<file>.+)$"), "resolve"),
    ("HEAD", re.compile(rf"^/{_REPO}/resolve/(?P<rev>[^/]+)/(?P<file>.+)$"), "resolve"),
]


def git_blob_sha1(data: bytes) -> str:
    """The git object id of a blob, which is what the Hub reports as a regular file's oid and ETag."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class FakeRepo:
    private: bool
    files: dict = field(default_factory=dict)  # path -> bytes at the head of main
    commits: list = field(default_factory=list)  # [(oid, summary, {path: bytes})], oldest first

    @property
    def head(self) -> str:
        return self.commits[-1][0] if self.commits else "0" * 40


class FakeHub:
    """``with FakeHub(tokens={"hf_test": "alice"}) as hub: ...`` then point `HF_ENDPOINT` at ``hub.endpoint``."""

    def __init__(self, tokens: Optional[dict] = None):
        self.tokens = dict(tokens or {})  # token -> user name
        self.repos: dict[str, FakeRepo] = {}
        self.requests: list[tuple[str, str]] = []  # (method, path) of every request, in order
        self.create_payloads: list[dict] = []
        self.commit_payloads: list[list[dict]] = []
        self._lock = threading.Lock()
        self._server: Optional[ThreadingHTTPServer] = None
        self._thread: Optional[threading.Thread] = None

    @property
    def endpoint(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> "FakeHub":
        hub = self

        class Handler(_Handler):
            fake_hub = hub

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="fake-hub", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def user_of(self, headers) -> Optional[str]:
        auth = headers.get("Authorization", "")
        return self.tokens.get(auth[len("Bearer "):]) if auth.startswith("Bearer ") else None

    def seed_repo(self, repo_id: str, files: dict, private: bool = False) -> None:
        """Put a repo on the server directly (e.g. a base model that the test does not push)."""
        with self._lock:
            repo = self.repos.setdefault(repo_id, FakeRepo(private=private))
            self._apply_commit(repo, "seed", {p: (b if isinstance(b, bytes) else bytes(b)) for p, b in files.items()}, [])

    def _apply_commit(self, repo: FakeRepo, summary: str, added: dict, deleted: list) -> str:
        for path in deleted:
            repo.files.pop(path, None)
        repo.files.update(added)
        digest = hashlib.sha1(repo.head.encode() + summary.encode())
        for path in sorted(repo.files):
            digest.update(path.encode() + b"\0" + git_blob_sha1(repo.files[path]).encode())
        oid = digest.hexdigest()
        repo.commits.append((oid, summary, dict(repo.files)))
        return oid

    def files_at(self, repo: FakeRepo, revision: str) -> Optional[dict]:
        if revision == "main":
            return repo.files
        for oid, _, files in repo.commits:
            if oid == revision:
                return files
        return None


class _Handler(BaseHTTPRequestHandler):
    fake_hub: FakeHub
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:  # keep pytest output clean
        pass

    # -- plumbing -------------------------------------------------------------------------------------------
    def _dispatch(self, method: str) -> None:
        path = unquote(urlsplit(self.path).path)
        body = b""
        if method == "POST":
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        with self.fake_hub._lock:
            self.fake_hub.requests.append((method, path))
            for route_method, pattern, name in _ROUTES:
                match = pattern.match(path)
                if route_method == method and match:
                    getattr(self, f"_{name}")(match, body, head=(method == "HEAD"))
                    return
        self._json(404, {"error": f"fake hub has no route for {method} {path}"})

    def do_GET(self):
        self._dispatch("GET")

    def do_HEAD(self):
        self._dispatch("HEAD")

    def do_POST(self):
        self._dispatch("POST")

    def _send(self, status: int, body: bytes, headers: dict, head: bool = False) -> None:
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def _json(self, status: int, obj, headers: Optional[dict] = None, head: bool = False) -> None:
        self._send(status, json.dumps(obj).encode(), {"Content-Type": "application/json", **(headers or {})}, head)

    def _error(self, status: int, code: str, message: str, head: bool = False) -> None:
        self._json(status, {"error": message}, {"X-Error-Code": code, "X-Error-Message": message}, head)

    def _readable_repo(self, repo_id: str, head: bool = False) -> Optional[FakeRepo]:
        repo = self.fake_hub.repos.get(repo_id)
        if repo is None or (repo.private and self.fake_hub.user_of(self.headers) is None):
            # The Hub does not reveal whether a private repo exists.
            self._error(401 if repo is not None else 404, "RepoNotFound", f"Repository not found: {repo_id}", head)
            return None
        return repo

    def _writable_repo(self, repo_id: str) -> Optional[FakeRepo]:
        user = self.fake_hub.user_of(self.headers)
        if user is None:
            self._error(401, "Unauthorized", "Invalid credentials in Authorization header")
            return None
        return self._readable_repo(repo_id)

    # -- routes ---------------------------------------------------------------------------------------------
    def _whoami(self, match, body, head=False):
        user = self.fake_hub.user_of(self.headers)
        if user is None:
            self._error(401, "Unauthorized", "Invalid credentials in Authorization header")
            return
        self._json(200, {"type": "user", "name": user, "auth": {"type": "access_token"}})

    def _create_repo(self, match, body, head=False):
        user = self.fake_hub.user_of(self.headers)
        if user is None:
            self._error(401, "Unauthorized", "Invalid credentials in Authorization header")
            return
        payload = json.loads(body)
        self.fake_hub.create_payloads.append(payload)
        if payload.get("type", "model") != "model":
            self._json(400, {"error": "fake hub serves model repos only"})
            return
        repo_id = f"{payload.get('organization') or user}/{payload['name']}"
        url = f"{self.fake_hub.endpoint}/{repo_id}"
        if repo_id in self.fake_hub.repos:
            self._json(409, {"error": "You already created this model repo", "url": url})
            return
        self.fake_hub.repos[repo_id] = FakeRepo(private=payload.get("visibility") == "private")
        self._json(200, {"url": url, "name": repo_id})

    def _validate_yaml(self, match, body, head=False):
        content = json.loads(body)["content"]
        errors = []
        if content.startswith("---"):
            parts = content.split("---", 2)
            try:
                meta = yaml.safe_load(parts[1]) if len(parts) == 3 else None
                if len(parts) != 3 or not isinstance(meta, dict):
                    errors.append({"message": "metadata block must be a YAML mapping between '---' lines"})
            except yaml.YAMLError as e:
                errors.append({"message": f"invalid YAML: {e}"})
        self._json(400 if errors else 200, {"errors": errors, "warnings": []})

    def _preupload(self, match, body, head=False):
        repo = self._writable_repo(match["repo"])
        if repo is None:
            return
        files = []
        for f in json.loads(body)["files"]:
            existing = repo.files.get(f["path"])
            files.append({
                "path": f["path"],
                "uploadMode": "regular",
                "shouldIgnore": False,
                "oid": git_blob_sha1(existing) if existing is not None else None,
            })
        self._json(200, {"files": files, "commitOid": repo.head})

    def _commit(self, match, body, head=False):
        repo = self._writable_repo(match["repo"])
        if repo is None:
            return
        if match["rev"] != "main":
            self._error(404, "RevisionNotFound", f"fake hub commits to main only, not {match['rev']!r}")
            return
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        self.fake_hub.commit_payloads.append(lines)
        if not lines or lines[0].get("key") != "header":
            self._json(400, {"error": "commit payload must start with a header line"})
            return
        added, deleted = {}, []
        for line in lines[1:]:
            key, value = line["key"], line["value"]
            if key == "file" and value.get("encoding") == "base64":
                added[value["path"]] = base64.b64decode(value["content"])
            elif key == "deletedFile":
                deleted.append(value["path"])
            else:
                self._json(400, {"error": f"fake hub does not support commit operation {key!r}"})
                return
        oid = self.fake_hub._apply_commit(repo, lines[0]["value"]["summary"], added, deleted)
        self._json(200, {
            "commitUrl": f"{self.fake_hub.endpoint}/{match['repo']}/commit/{oid}",
            "commitOid": oid,
            "pullRequestUrl": None,
        })

    def _repo_info(self, match, body, head=False):
        repo = self._readable_repo(match["repo"])
        if repo is None:
            return
        files = self.fake_hub.files_at(repo, match["rev"] or "main")
        if files is None:
            self._error(404, "RevisionNotFound", f"Invalid rev id: {match['rev']}")
            return
        self._json(200, {
            "id": match["repo"],
            "sha": repo.head if (match["rev"] or "main") == "main" else match["rev"],
            "private": repo.private,
            "siblings": [{"rfilename": p} for p in sorted(files)],
        })

    def _tree(self, match, body, head=False):
        repo = self._readable_repo(match["repo"])
        if repo is None:
            return
        files = self.fake_hub.files_at(repo, match["rev"])
        if files is None:
            self._error(404, "RevisionNotFound", f"Invalid rev id: {match['rev']}")
            return
        prefix = (match["dir"].strip("/") + "/") if match["dir"] else ""
        entries, folders = [], set()
        for path in sorted(p for p in files if p.startswith(prefix)):
            rest = path[len(prefix):]
            if "/" in rest:  # not recursive: report the sub-folder once
                folders.add(prefix + rest.split("/", 1)[0])
            else:
                entries.append({"type": "file", "path": path, "size": len(files[path]), "oid": git_blob_sha1(files[path])})
        if prefix and not entries and not folders:
            self._error(404, "EntryNotFound", f"{match['dir']} does not exist on {match['rev']}")
            return
        self._json(200, entries + [{"type": "directory", "path": f, "oid": "0" * 40} for f in sorted(folders)])

    def _resolve(self, match, body, head=False):
        repo = self._readable_repo(match["repo"], head)
        if repo is None:
            return
        files = self.fake_hub.files_at(repo, match["rev"])
        if files is None:
            self._error(404, "RevisionNotFound", f"Invalid rev id: {match['rev']}", head)
            return
        data = files.get(match["file"])
        if data is None:
            self._error(404, "EntryNotFound", f"Entry not found: {match['file']}", head)
            return
        commit = repo.head if match["rev"] == "main" else match["rev"]
        headers = {
            "Content-Type": "application/octet-stream",
            "X-Repo-Commit": commit,
            "ETag": f'"{git_blob_sha1(data)}"',
            "Accept-Ranges": "none",
        }
        self._send(200, data, headers, head)


def point_hub_clients_at(monkeypatch, endpoint: str, cache_dir: str) -> None:
    """Send every `huggingface_hub` call of this test to `endpoint`, caching downloads under `cache_dir`.

    `huggingface_hub.constants` reads HF_ENDPOINT / HF_HUB_CACHE once at import, and the module-level `HfApi`
    behind `file_exists` & co. (and transformers' shared one) keep the endpoint they were built with, so the
    environment alone is not enough.
    """
    import huggingface_hub
    from huggingface_hub import constants, hf_api

    monkeypatch.setenv("HF_ENDPOINT", endpoint)
    monkeypatch.setenv("HF_HUB_CACHE", cache_dir)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(constants, "ENDPOINT", endpoint)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", endpoint + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", cache_dir)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hf_api.api, "endpoint", endpoint)
    # transformers keeps one lazily built HfApi (with the endpoint of its first use) for its Hub calls.
    import transformers.utils.hub as transformers_hub

    if hasattr(transformers_hub, "_hf_api"):
        monkeypatch.setattr(transformers_hub, "_hf_api", None)
    assert huggingface_hub.constants is constants
