"""A small local Hugging Face Hub for tests: stdlib only, enough of the API that huggingface_hub 2.x
uses to create repos, push (regular uploads), read repo info and trees, and download with Range.

Repos live in a temporary folder: blobs content-addressed by sha256, one file map per commit.
Every request is logged (method, path, Range) so tests can prove what was and wasn't fetched.
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse


@dataclass
class Repo:
    private: bool
    commits: list[tuple[str, dict[str, str]]] = field(default_factory=list)  # (sha, {path: blob sha256})

    @property
    def head(self) -> tuple[str, dict[str, str]]:
        return self.commits[-1]


class LocalHub:
    """Start with `with LocalHub(root, users) as hub:`; `hub.url` is the endpoint."""

    def __init__(self, root: Path, tokens: dict[str, dict], port: int = 0):
        self.root = Path(root)
        (self.root / "blobs").mkdir(parents=True, exist_ok=True)
        self.tokens = tokens  # token -> {"name": user, "orgs": [org, ...]}
        self.repos: dict[str, Repo] = {}
        self.log: list[dict] = []
        self.fail_next_commit = False
        self.lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", port), self._handler())
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self) -> LocalHub:
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()

    def requests(self, method: str | None = None, contains: str = "") -> list[dict]:
        return [r for r in self.log if (method is None or r["method"] == method) and contains in r["path"]]

    # ---- storage ------------------------------------------------------------------------------
    def _blob(self, data: bytes) -> str:
        digest = hashlib.sha256(data).hexdigest()
        path = self.root / "blobs" / digest
        if not path.exists():
            path.write_bytes(data)
        return digest

    def _commit(self, repo: Repo, files: dict[str, str]) -> str:
        sha = hashlib.sha1(f"{time.time_ns()}{len(repo.commits)}{sorted(files.items())}".encode()).hexdigest()
        repo.commits.append((sha, files))
        return sha

    def _snapshot(self, repo: Repo, revision: str) -> tuple[str, dict[str, str]] | None:
        if revision in ("main", "HEAD"):
            return repo.head
        return next((c for c in repo.commits if c[0] == revision), None)

    # ---- HTTP -------------------------------------------------------------------------------
    def _handler(self):
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def _user(self) -> dict | None:
                auth = self.headers.get("Authorization", "")
                return hub.tokens.get(auth.removeprefix("Bearer ").strip()) if auth else None

            def _send(
                self, status: int, body=b"", headers: dict | None = None, content_type="application/json"
            ):
                if not isinstance(body, bytes):
                    body = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                for key, value in (headers or {}).items():
                    self.send_header(key, value)
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            def _error(self, status: int, message: str, code: str | None = None, **extra):
                headers = {"X-Error-Message": message}
                if code:
                    headers["X-Error-Code"] = code
                self._send(status, {"error": message, **extra}, headers)

            def _body(self) -> bytes:
                if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
                    data = b""
                    while True:
                        size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                        if size == 0:
                            self.rfile.readline()
                            return data
                        data += self.rfile.read(size)
                        self.rfile.readline()
                length = int(self.headers.get("Content-Length") or 0)
                return self.rfile.read(length) if length else b""

            def _visible(self, repo_id: str) -> Repo | None:
                repo = hub.repos.get(repo_id)
                if repo is None:
                    return None
                if repo.private:
                    user = self._user()
                    if user is None or repo_id.split("/")[0] not in {user["name"], *user.get("orgs", [])}:
                        return None
                return repo

            def _dispatch(self):
                self.body = self._body()  # always consume it: keep-alive connections carry the next request
                path = unquote(urlparse(self.path).path)
                hub.log.append({"method": self.command, "path": path, "range": self.headers.get("Range")})
                parts = path.strip("/").split("/")
                with hub.lock:
                    if path == "/api/whoami-v2":
                        return self._whoami()
                    if path == "/api/repos/create" and self.command == "POST":
                        return self._create()
                    if path == "/api/repos/delete" and self.command == "DELETE":
                        return self._delete()
                    if path == "/api/validate-yaml":
                        return self._send(200, {"errors": [], "warnings": []})
                    if parts[:2] == ["api", "models"] and len(parts) >= 4:
                        repo_id = f"{parts[2]}/{parts[3]}"
                        rest = parts[4:]
                        if not rest:
                            return self._info(repo_id, "main")
                        if rest[0] == "revision":
                            return self._info(repo_id, "/".join(rest[1:]))
                        if rest[0] == "preupload":
                            return self._preupload(repo_id)
                        if rest[0] == "commit":
                            return self._commit(repo_id)
                        if rest[0] == "tree":
                            return self._tree(repo_id, rest[1], "/".join(rest[2:]))
                    if len(parts) >= 5 and parts[2] == "resolve":
                        return self._resolve(f"{parts[0]}/{parts[1]}", parts[3], "/".join(parts[4:]))
                self._error(404, f"no route for {self.command} {path}")

            do_GET = do_POST = do_HEAD = do_DELETE = do_PUT = lambda self: self._dispatch()

            def _whoami(self):
                user = self._user()
                if user is None:
                    return self._error(401, "Invalid credentials in Authorization header")
                self._send(
                    200,
                    {
                        "type": "user",
                        "name": user["name"],
                        "fullname": user["name"].title(),
                        "avatarUrl": "",
                        "orgs": [{"name": o, "type": "org"} for o in user.get("orgs", [])],
                        "auth": {
                            "type": "access_token",
                            "accessToken": {"displayName": "test", "role": "write"},
                        },
                    },
                )

            def _create(self):
                user = self._user()
                if user is None:
                    return self._error(401, "Invalid credentials in Authorization header")
                payload = json.loads(self.body or b"{}")
                namespace = payload.get("organization") or user["name"]
                repo_id = f"{namespace}/{payload['name']}"
                if namespace not in {user["name"], *user.get("orgs", [])}:
                    return self._error(403, f"You don't have the rights to create a model under {namespace}")
                if repo_id in hub.repos:
                    return self._error(409, "You already created this model repo", url=f"{hub.url}/{repo_id}")
                repo = Repo(private=bool(payload.get("private")) or payload.get("visibility") == "private")
                hub._commit(repo, {})
                hub.repos[repo_id] = repo
                self._send(200, {"url": f"{hub.url}/{repo_id}", "name": repo_id, "id": repo_id})

            def _delete(self):
                user = self._user()
                payload = json.loads(self.body or b"{}")
                repo_id = f"{payload.get('organization') or (user or {}).get('name')}/{payload['name']}"
                if user is None or repo_id not in hub.repos:
                    return self._error(404, "Repository not found", "RepoNotFound")
                del hub.repos[repo_id]
                self._send(200, {})

            def _lookup(self, repo_id: str, revision: str):
                """(repo, (sha, files)) the caller may see, or None after answering 404."""
                repo = self._visible(repo_id)
                if repo is None:
                    self._error(404, "Repository not found", "RepoNotFound")
                    return None
                snap = hub._snapshot(repo, revision)
                if snap is None:
                    self._error(404, f"Invalid rev id: {revision}", "RevisionNotFound")
                    return None
                return repo, snap

            def _info(self, repo_id: str, revision: str):
                found = self._lookup(repo_id, revision)
                if found is None:
                    return None
                repo, (sha, files) = found
                self._send(
                    200,
                    {
                        "_id": repo_id,
                        "id": repo_id,
                        "modelId": repo_id,
                        "author": repo_id.split("/")[0],
                        "sha": sha,
                        "private": repo.private,
                        "disabled": False,
                        "gated": False,
                        "tags": [],
                        "downloads": 0,
                        "likes": 0,
                        "lastModified": "2026-11-28T00:00:00.000Z",
                        "createdAt": "2026-11-28T00:00:00.000Z",
                        "siblings": [
                            {"rfilename": p, "size": (hub.root / "blobs" / b).stat().st_size}
                            for p, b in sorted(files.items())
                        ],
                    },
                )

            def _writable(self, repo_id: str) -> Repo | None:
                user = self._user()
                if user is None or repo_id.split("/")[0] not in {user["name"], *user.get("orgs", [])}:
                    self._error(401, "Invalid credentials in Authorization header")
                    return None
                repo = hub.repos.get(repo_id)
                if repo is None:
                    self._error(404, "Repository not found", "RepoNotFound")
                return repo

            def _preupload(self, repo_id: str):
                payload = json.loads(self.body or b"{}")
                if self._writable(repo_id) is None:
                    return None
                files = [
                    {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False, "oid": None}
                    for f in payload.get("files", [])
                ]
                self._send(200, {"files": files, "commitOid": hub.repos[repo_id].head[0]})

            def _commit(self, repo_id: str):
                body = self.body
                repo = self._writable(repo_id)
                if repo is None:
                    return None
                if hub.fail_next_commit:
                    hub.fail_next_commit = False
                    return self._error(400, "Simulated failure while committing (test)")
                files = dict(repo.head[1])
                summary = ""
                for line in body.decode().splitlines():
                    if not line.strip():
                        continue
                    item = json.loads(line)
                    value = item["value"]
                    if item["key"] == "header":
                        summary = value.get("summary", "")
                    elif item["key"] == "file":
                        files[value["path"]] = hub._blob(base64.b64decode(value["content"]))
                    elif item["key"] == "deletedFile":
                        files.pop(value["path"], None)
                    else:
                        return self._error(400, f"unsupported commit operation {item['key']} in the test hub")
                sha = hub._commit(repo, files)
                self._send(
                    200,
                    {
                        "commitUrl": f"{hub.url}/{repo_id}/commit/{sha}",
                        "commitOid": sha,
                        "commitMessage": summary,
                    },
                )

            def _tree(self, repo_id: str, revision: str, prefix: str):
                found = self._lookup(repo_id, revision)
                if found is None:
                    return None
                _, snap = found
                entries = [
                    {"type": "file", "path": p, "oid": b, "size": (hub.root / "blobs" / b).stat().st_size}
                    for p, b in sorted(snap[1].items())
                    if p.startswith(prefix)
                ]
                self._send(200, entries)

            def _resolve(self, repo_id: str, revision: str, filename: str):
                found = self._lookup(repo_id, revision)
                if found is None:
                    return None
                _, (sha, files) = found
                if filename not in files:
                    return self._error(404, f"Entry not found: {filename}", "EntryNotFound")
                data = (hub.root / "blobs" / files[filename]).read_bytes()
                headers = {"X-Repo-Commit": sha, "ETag": f'"{files[filename]}"', "Accept-Ranges": "bytes"}
                status = 200
                wanted = self.headers.get("Range")
                if wanted and wanted.startswith("bytes="):
                    start_s, _, end_s = wanted[6:].partition("-")
                    start = int(start_s)
                    end = min(int(end_s) if end_s else len(data) - 1, len(data) - 1)
                    headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
                    data = data[start : end + 1]
                    status = 206
                self._send(status, data, headers, content_type="application/octet-stream")

        return Handler
