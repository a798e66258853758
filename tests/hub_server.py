"""A small local Hugging Face Hub for tests: stdlib only, enough of the API that huggingface_hub 2.x
uses to create repos, push (inline and LFS uploads: preupload → batch → PUT), read repo info and
trees with LFS metadata, and download with Range.

Repos live in a temporary folder: blobs content-addressed by sha256, one file map per commit, and
per repo the LFS objects uploaded to it (kept without a commit, as the Hub keeps them). Bodies are
streamed to and from disk, so multi-GB files cost no memory. Test switches: `flaky_every` cuts every
n-th ranged weight read half-way, `corrupt` flips a served byte, `fail_next_commit`, and `link`
limits bandwidth like one full-duplex line (B bytes/s down and B up, shared by all connections).
Every request is logged (method, path, Range, bytes) so tests can prove what was and wasn't sent.

Standalone (for the benchmark): `python tests/hub_server.py ROOT --port P --token hf_x:alice`.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import hashlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlparse

IO_CHUNK = 256 * 1024
LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf")


class Link:
    """A full-duplex line of `bytes_per_s` each way, shared by every connection (token buckets).

    A bucket holds at most BURST bytes of credit, so time a sender spends between chunks (reading
    its file, hashing) counts as line time, as on a real line, instead of slowing the rate.
    """

    BURST = 1024 * 1024

    def __init__(self, bytes_per_s: float | None = None):
        self.bytes_per_s = bytes_per_s
        self._locks = {"down": threading.Lock(), "up": threading.Lock()}
        self._next = {"down": 0.0, "up": 0.0}  # when the line is free again, per direction

    def pass_bytes(self, direction: str, count: int) -> None:
        if not self.bytes_per_s:
            return
        with self._locks[direction]:
            now = time.monotonic()
            start = max(now - self.BURST / self.bytes_per_s, self._next[direction])
            self._next[direction] = start + count / self.bytes_per_s
            wait = self._next[direction] - now
        if wait > 0:
            time.sleep(wait)


@dataclass
class Repo:
    private: bool
    commits: list[tuple[str, dict[str, str]]] = field(default_factory=list)  # (sha, {path: blob sha256})
    lfs: set[str] = field(default_factory=set)  # LFS objects uploaded to this repo (oids)

    @property
    def head(self) -> tuple[str, dict[str, str]]:
        return self.commits[-1]


@dataclass
class Job:
    """A submitted Job, run as a local subprocess (its image stands for this machine's environment)."""

    id: str
    namespace: str
    spec: dict
    created: str
    stage: str = "RUNNING"
    lines: list[tuple[str, str]] = field(default_factory=list)  # (timestamp, log line)
    proc: subprocess.Popen | None = None
    env: dict = field(default_factory=dict)  # what the process got (tests check where the token went)

    def info(self) -> dict:
        image = (
            {"spaceId": self.spec["spaceId"]}
            if "spaceId" in self.spec
            else {"dockerImage": self.spec.get("dockerImage")}
        )
        return {
            "id": self.id,
            "createdAt": self.created,
            **image,
            "command": self.spec.get("command"),
            "arguments": self.spec.get("arguments", []),
            "environment": self.spec.get("environment", {}),
            "secrets": {name: "***" for name in self.spec.get("secrets", {})},  # never the values
            "flavor": self.spec.get("flavor"),
            "labels": self.spec.get("labels"),
            "status": {"stage": self.stage, "message": None},
            "owner": {"id": self.namespace, "name": self.namespace, "type": "user"},
        }


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime())


class LocalHub:
    """Start with `with LocalHub(root, users) as hub:`; `hub.url` is the endpoint."""

    def __init__(self, root: Path, tokens: dict[str, dict], port: int = 0):
        self.root = Path(root)
        (self.root / "blobs").mkdir(parents=True, exist_ok=True)
        self.tokens = tokens  # token -> {"name": user, "orgs": [org, ...]}
        self.repos: dict[str, Repo] = {}
        self.log: list[dict] = []
        self.fail_next_commit = False
        self.flaky_every = 0  # cut every n-th ranged read of a weight file half-way (0: never)
        self.corrupt: dict[str, int] = {}  # "repo/path" -> offset of a byte flipped when served
        self.link = Link()
        self.lfs_blobs: set[str] = set()  # blobs stored through LFS (shown with LFS metadata)
        self.announced: set[tuple[str, str]] = set()  # (repo, oid) a batch answer asked the client to PUT
        self._served_ranges = 0
        self.jobs: dict[str, Job] = {}
        self.lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", port), self._handler())
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self) -> LocalHub:
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()

    def requests(self, method: str | None = None, contains: str = "") -> list[dict]:
        return [r for r in self.log if (method is None or r["method"] == method) and contains in r["path"]]

    def blob_path(self, repo_id: str, path: str, revision: str = "main") -> Path:
        """Where a file of a repo's revision is stored (tests flip bytes in served copies with `corrupt`)."""
        return self.root / "blobs" / self._snapshot(self.repos[repo_id], revision)[1][path]

    # ---- storage ------------------------------------------------------------------------------
    def _blob(self, data: bytes) -> str:
        digest = hashlib.sha256(data).hexdigest()
        path = self.root / "blobs" / digest
        if not path.exists():
            path.write_bytes(data)
        return digest

    def _blob_from_stream(self, read, length: int) -> str:
        """Store `length` bytes read in chunks from `read` (passed through the link); their sha256."""
        digest = hashlib.sha256()
        with tempfile.NamedTemporaryFile(dir=self.root / "blobs", delete=False) as tmp:
            left = length
            while left:
                data = read(min(IO_CHUNK, left))
                if not data:
                    break
                self.link.pass_bytes("up", len(data))
                digest.update(data)
                tmp.write(data)
                left -= len(data)
        final = self.root / "blobs" / digest.hexdigest()
        os.replace(tmp.name, final)
        return digest.hexdigest()

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
                parsed = urlparse(self.path)
                path = unquote(parsed.path)
                self.query = parse_qs(parsed.query)
                entry = {
                    "method": self.command,
                    "path": path,
                    "range": self.headers.get("Range"),
                    "bytes": 0,
                    # which token a request carried: tests check whose credentials reach the Hub
                    "token": (self.headers.get("Authorization") or "").removeprefix("Bearer ").strip()
                    or None,
                }
                hub.log.append(entry)
                self.entry = entry
                parts = path.strip("/").split("/")
                if self.command == "PUT" and parts[0] == "lfs-upload":  # streamed to disk, outside the lock
                    return self._lfs_put("/".join(parts[1:3]), parts[3])
                if len(parts) >= 5 and parts[2] == "resolve" and self.command in ("GET", "HEAD"):
                    self.body = self._body()
                    with hub.lock:
                        found = self._resolve_lookup(f"{parts[0]}/{parts[1]}", parts[3], "/".join(parts[4:]))
                    return None if found is None else self._serve_file(*found)
                self.body = self._body()  # always consume it: keep-alive connections carry the next request
                if parts[:2] == ["api", "jobs"] and len(parts) >= 3:
                    return self._jobs(parts[2], parts[3:])
                with hub.lock:
                    if path == "/_admin/link" and self.command == "POST":
                        hub.link.bytes_per_s = (
                            float(json.loads(self.body or b"{}").get("bytes_per_s") or 0) or None
                        )
                        return self._send(200, {"bytes_per_s": hub.link.bytes_per_s})
                    if path == "/_admin/log":
                        return self._send(200, hub.log[:-1])
                    if (
                        len(parts) >= 6
                        and parts[1].endswith(".git")
                        and parts[2:] == ["info", "lfs", "objects", "batch"]
                    ):
                        return self._lfs_batch(f"{parts[0]}/{parts[1].removesuffix('.git')}")
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
                self._error(404, f"no route for {self.command} {path}")

            do_GET = do_POST = do_HEAD = do_DELETE = do_PUT = lambda self: self._dispatch()

            # ---- Jobs: submit, inspect, logs (server-sent events), cancel ----------------------------------
            def _jobs(self, namespace: str, rest: list[str]):
                user = self._user()
                if user is None:
                    return self._error(401, "Invalid credentials in Authorization header")
                if namespace not in {user["name"], *user.get("orgs", [])}:
                    return self._error(403, f"You cannot run or see Jobs in the namespace {namespace}")
                if not rest and self.command == "POST":
                    return self._send(200, self._start_job(namespace, json.loads(self.body or b"{}")).info())
                job = hub.jobs.get(rest[0]) if rest else None
                if job is None or job.namespace != namespace:
                    return self._error(404, "Job not found")
                if len(rest) == 1:
                    return self._send(200, job.info())
                if rest[1] == "cancel" and self.command == "POST":
                    if job.stage == "RUNNING" and job.proc is not None:
                        job.stage = "CANCELED"
                        job.proc.terminate()
                    return self._send(200, {})
                if rest[1] == "logs":
                    return self._job_logs(job)
                return self._error(404, "no such Job route")

            def _start_job(self, namespace: str, spec: dict) -> Job:
                job = Job(hashlib.sha1(os.urandom(8)).hexdigest()[:24], namespace, spec, _now())
                command = list(spec.get("command") or [])
                if command and command[0] == "python":
                    command[0] = sys.executable  # the image's python is this machine's
                job.env = {
                    **os.environ,
                    **spec.get("environment", {}),
                    **spec.get("secrets", {}),
                    "HF_ENDPOINT": hub.url,
                }
                job.proc = subprocess.Popen(
                    command,
                    env=job.env,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                    text=True,
                    bufsize=1,
                )

                def follow():
                    for line in job.proc.stdout:
                        job.lines.append((_now(), line.rstrip("\n")))
                    code = job.proc.wait()
                    if job.stage == "RUNNING":
                        job.stage = "COMPLETED" if code == 0 else "ERROR"

                threading.Thread(target=follow, daemon=True).start()
                hub.jobs[job.id] = job
                return job

            def _job_logs(self, job: Job):
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.send_header("Connection", "close")
                self.end_headers()
                self.close_connection = True
                sent = 0
                try:
                    while True:
                        finished = job.stage != "RUNNING"
                        while sent < len(job.lines):
                            stamp, line = job.lines[sent]
                            self.wfile.write(
                                f"data: {json.dumps({'data': line, 'timestamp': stamp})}\n\n".encode()
                            )
                            sent += 1
                        self.wfile.flush()
                        if finished and sent >= len(job.lines):
                            return None
                        time.sleep(0.05)
                except (BrokenPipeError, ConnectionResetError):
                    return None

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

            # ---- LFS uploads: batch (which objects to send), then one PUT each ----------------------
            def _lfs_batch(self, repo_id: str):
                repo = self._writable(repo_id)
                if repo is None:
                    return None
                payload = json.loads(self.body or b"{}")
                objects = []
                for obj in payload.get("objects", []):
                    answer = {"oid": obj["oid"], "size": obj["size"]}
                    if obj["oid"] not in repo.lfs:  # stored objects come back with no "actions" at all
                        hub.announced.add((repo_id, obj["oid"]))  # the upload URL works like a presigned one
                        href = f"{hub.url}/lfs-upload/{repo_id}/{obj['oid']}"
                        answer["actions"] = {"upload": {"href": href}}
                    objects.append(answer)
                self._send(200, {"transfer": "basic", "objects": objects})

            def _lfs_put(self, repo_id: str, oid: str):
                length = int(self.headers.get("Content-Length") or 0)
                with hub.lock:
                    repo = hub.repos.get(repo_id) if (repo_id, oid) in hub.announced else None
                if repo is None:
                    self.rfile.read(length)
                    return self._error(403, "upload not announced by a batch request")
                digest = hub._blob_from_stream(self.rfile.read, length)
                self.entry["bytes"] = length
                if digest != oid:
                    return self._error(400, f"uploaded bytes have sha256 {digest}, not {oid}")
                with hub.lock:
                    repo.lfs.add(oid)
                    hub.lfs_blobs.add(oid)
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
                        "siblings": [self._sibling(p, b) for p, b in sorted(files.items())],
                    },
                )

            def _sibling(self, path: str, blob: str) -> dict:
                size = (hub.root / "blobs" / blob).stat().st_size
                entry = {"rfilename": path, "size": size, "blobId": hashlib.sha1(blob.encode()).hexdigest()}
                if blob in hub.lfs_blobs:
                    entry["lfs"] = {"sha256": blob, "size": size, "pointerSize": 134}
                return entry

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
                    {
                        "path": f["path"],
                        "uploadMode": "lfs" if f["path"].endswith(LFS_SUFFIXES) else "regular",
                        "shouldIgnore": False,
                        "oid": None,
                    }
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
                    elif item["key"] == "lfsFile":
                        if value["oid"] not in repo.lfs:
                            return self._error(
                                422, f"LFS object {value['oid']} of {value['path']} was never uploaded"
                            )
                        files[value["path"]] = value["oid"]
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
                entries = []
                for p, b in sorted(snap[1].items()):
                    if p.startswith(prefix):
                        sib = self._sibling(p, b)
                        entry = {"type": "file", "path": p, "oid": sib["blobId"], "size": sib["size"]}
                        if "lfs" in sib:
                            entry["lfs"] = {"oid": b, "size": sib["size"], "pointerSize": 134}
                        entries.append(entry)
                self._send(200, entries)

            def _resolve_lookup(self, repo_id: str, revision: str, filename: str):
                found = self._lookup(repo_id, revision)
                if found is None:
                    return None
                _, (sha, files) = found
                if filename not in files:
                    self._error(404, f"Entry not found: {filename}", "EntryNotFound")
                    return None
                return repo_id, sha, filename, files[filename]

            def _serve_file(self, repo_id: str, sha: str, filename: str, blob: str):
                """Send a file (or the asked range) from disk in chunks, through the link and the test faults."""
                path = hub.root / "blobs" / blob
                size = path.stat().st_size
                headers = {"X-Repo-Commit": sha, "ETag": f'"{blob}"', "Accept-Ranges": "bytes"}
                if blob in hub.lfs_blobs:
                    headers |= {"X-Linked-Etag": f'"{blob}"', "X-Linked-Size": str(size)}
                start, end, status = 0, size - 1, 200
                wanted = self.headers.get("Range")
                if wanted and wanted.startswith("bytes="):
                    start_s, _, end_s = wanted[6:].partition("-")
                    start = int(start_s)
                    end = min(int(end_s) if end_s else size - 1, size - 1)
                    headers["Content-Range"] = f"bytes {start}-{end}/{size}"
                    status = 206
                length = max(0, end - start + 1)
                cut_at = None
                if (
                    status == 206
                    and self.command == "GET"
                    and filename.endswith(".safetensors")
                    and length > 4096
                ):
                    with hub.lock:
                        hub._served_ranges += 1
                        if hub.flaky_every and hub._served_ranges % hub.flaky_every == 0:
                            cut_at = length // 2
                flip = hub.corrupt.get(f"{repo_id}/{filename}")
                self.send_response(status)
                self.send_header("Content-Type", "application/octet-stream")
                self.send_header("Content-Length", str(length))
                for key, value in headers.items():
                    self.send_header(key, value)
                self.end_headers()
                if self.command == "HEAD":
                    return
                sent = 0
                with open(path, "rb") as f:
                    f.seek(start)
                    while sent < length:
                        data = bytearray(f.read(min(IO_CHUNK, length - sent)))
                        if flip is not None and start + sent <= flip < start + sent + len(data):
                            data[flip - start - sent] ^= 0xFF
                        if cut_at is not None and sent + len(data) > cut_at:
                            data = data[: cut_at - sent]
                        hub.link.pass_bytes("down", len(data))
                        try:
                            self.wfile.write(data)
                        except (BrokenPipeError, ConnectionResetError):
                            self.close_connection = True
                            return
                        sent += len(data)
                        self.entry["bytes"] = sent
                        if cut_at is not None and sent >= cut_at:  # a connection cut half-way (flaky mode)
                            self.wfile.flush()
                            self.close_connection = True
                            self.connection.shutdown(socket.SHUT_RDWR)
                            return

        return Handler


def main() -> None:
    parser = argparse.ArgumentParser(description="A local test Hub (for the benchmark).")
    parser.add_argument("root", help="folder for blobs")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--token", action="append", default=[], help="TOKEN:USER (repeatable)")
    args = parser.parse_args()
    tokens = {t.split(":")[0]: {"name": t.split(":")[1], "orgs": []} for t in args.token}
    with LocalHub(Path(args.root), tokens, port=args.port) as hub:
        print(hub.url, flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            threading.Event().wait()


if __name__ == "__main__":
    main()
