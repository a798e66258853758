"""A small local Hugging Face Hub for tests: stdlib only, enough of the API that huggingface_hub 2.x
uses to create repos, push (inline and LFS uploads: preupload → batch → PUT), read repo info and
trees with LFS metadata, and download with Range.

Repos live in a temporary folder: blobs content-addressed by sha256, one file map per commit, and
per repo the LFS objects uploaded to it (kept without a commit, as the Hub keeps them). Bodies are
streamed to and from disk, so multi-GB files cost no memory. Test switches: `flaky_every` cuts every
n-th ranged weight read half-way, `corrupt` flips a served byte, `fail_next_commit`, and `link`
limits bandwidth like one full-duplex line (B bytes/s down and B up, shared by all connections).
Every request is logged (method, path, Range, bytes) so tests can prove what was and wasn't sent.

It behaves like the real Hub where a kind fake would hide bugs (DESIGN.md 3b):
- weight files are served by a second origin: `resolve` answers 302 to the "CDN", which honours Range
  and refuses any request that carries an Authorization header;
- uploads speak Xet when `hf_xet` is installed: `xet-write-token` hands out a local CAS folder, and a
  commit's LFS pointer is accepted only once the file can be rebuilt from that CAS (sha256 checked);
- the upload mode (lfs / regular) follows the repo's `.gitattributes` (a new repo gets the Hub's
  default one) and the file size; repo ids are case-insensitive, other spellings get a 307;
- tokens carry scopes (OAuth: `read-repos`, `write-repos`, `manage-repos`, `gated-repos`, `jobs`);
- faults on request: 429 with `RateLimit` headers, a commit that lands and then answers 504, a
  private-storage quota 403, `validate-yaml` rejecting a `base_model` the Hub does not hold, and
  Jobs that are stopped at their timeout (30 minutes unless the spec says otherwise);
- a commit whose `parentCommit` is no longer its branch's head is refused (412), as two writers racing
  for one branch are; Jobs are listed by label and stage, and `jobs/hardware` lists flavours with prices.

Each job's requests carry `origin/job-<id>` in their User-Agent (logged as `agent`), and `on_commit`
(repo, revision, paths, agent) is called after each commit lands: tests tell the jobs of one run
apart and can kill one at a chosen point.

Standalone (for the benchmark): `python tests/hub_server.py ROOT --port P --token hf_x:alice`.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import fnmatch
import hashlib
import json
import os
import socket
import struct
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


LFS_THRESHOLD = (
    10 * 1024 * 1024
)  # the Hub stores files this large through LFS/Xet whatever .gitattributes says
DEFAULT_GITATTRIBUTES = "".join(
    f"{pattern} filter=lfs diff=lfs merge=lfs -text\n"
    for pattern in ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.gguf", "*.h5", "*.model", "*.safetensors", "*.zip")
)
ALL_SCOPES = frozenset({"read-repos", "write-repos", "manage-repos", "gated-repos", "jobs"})


@dataclass
class Repo:
    private: bool
    name: str = ""  # the canonical spelling (ids are case-insensitive)
    commits: list[tuple[str, dict[str, str], str]] = field(
        default_factory=list
    )  # (sha, {path: blob}, message)
    lfs: set[str] = field(default_factory=set)  # LFS objects uploaded to this repo (oids)
    gated: bool = False
    granted: set[str] = field(default_factory=set)  # users who accepted a gated repo's conditions
    branches: dict[str, list[tuple[str, dict[str, str], str]]] = field(default_factory=dict)  # beside main

    @property
    def head(self) -> tuple[str, dict[str, str], str]:
        return self.commits[-1]

    def history(self, branch: str) -> list[tuple[str, dict[str, str], str]]:
        return self.commits if branch in ("main", "HEAD") else self.branches[branch]


class RepoTable(dict):
    """Repos by id, looked up case-insensitively as the Hub does (`alice/MyModel` is `alice/mymodel`)."""

    def __setitem__(self, key, value):
        super().__setitem__(key.lower(), value)

    def __getitem__(self, key):
        return super().__getitem__(key.lower())

    def __delitem__(self, key):
        super().__delitem__(key.lower())

    def __contains__(self, key):
        return isinstance(key, str) and super().__contains__(key.lower())

    def get(self, key, default=None):
        return super().get(key.lower(), default)


def _flavour(name: str, pretty: str, cpu: str, ram: str, usd_per_hour: float, gpu: str | None = None) -> dict:
    per_minute = usd_per_hour / 60
    return {
        "name": name,
        "prettyName": pretty,
        "cpu": cpu,
        "ram": ram,
        "ephemeralStorage": "50 GB",
        "accelerator": {
            "type": "gpu",
            "model": gpu,
            "quantity": "1",
            "vram": "24 GB",
            "manufacturer": "Nvidia",
        }
        if gpu
        else None,
        "unitCostMicroUSD": round(per_minute * 1e6),
        "unitCostUSD": per_minute,
        "unitLabel": "minute",
    }


# GET /api/jobs/hardware, in the Hub's shape (prices per minute as the Hub lists them for Jobs)
JOB_HARDWARE = [
    _flavour("cpu-basic", "CPU Basic", "2 vCPU", "16 GB", 0.01),
    _flavour("cpu-upgrade", "CPU Upgrade", "8 vCPU", "32 GB", 0.03),
    _flavour("t4-small", "Nvidia T4 - small", "4 vCPU", "15 GB", 0.40, "T4"),
    _flavour("a10g-small", "Nvidia A10G - small", "4 vCPU", "15 GB", 1.00, "A10G"),
    _flavour("a10g-large", "Nvidia A10G - large", "12 vCPU", "46 GB", 1.50, "A10G"),
]


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

    message: str | None = None
    timeout_s: float = 30 * 60
    output_done: bool = False  # its output ended (the log stream ends then, maybe before the stage does)

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
            "status": {"stage": self.stage, "message": self.message},
            "timeoutSeconds": self.spec.get("timeoutSeconds"),
            "owner": {"id": self.namespace, "name": self.namespace, "type": "user"},
        }


def _member(user: dict, repo_id: str) -> bool:
    """Whether the user owns the repo's namespace (their own, or one of their orgs; case-insensitive)."""
    return repo_id.split("/")[0].lower() in {user["name"].lower(), *(o.lower() for o in user.get("orgs", []))}


def _log_request(hub: LocalHub, handler: BaseHTTPRequestHandler, path: str) -> dict:
    """Record a request (the entry's bytes are filled in as a body is served)."""
    entry = {
        "method": handler.command,
        "path": path,
        "range": handler.headers.get("Range"),
        "bytes": 0,
        "agent": handler.headers.get("User-Agent") or "",
        # which token a request carried: tests check whose credentials reach the Hub
        "token": (handler.headers.get("Authorization") or "").removeprefix("Bearer ").strip() or None,
    }
    hub.log.append(entry)
    return entry


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime())


def _download_from_cas(cas: Path, xet_hash: str, size: int, target: Path) -> None:
    import hf_xet

    with hf_xet.XetSession().new_file_download_group(
        endpoint=f"local://{cas}",
        token="local",
        token_expiry_unix_secs=int(time.time()) + 3600,
        token_refresh_url=None,
        token_refresh_headers=None,
        custom_headers={},
        progress_callback=None,
    ) as group:
        group.start_download_file(hf_xet.XetFileInfo(xet_hash, size), str(target))


def _xet_hex(raw: bytes) -> str:
    """A Xet hash as its tools print it: four little-endian 64-bit words."""
    return "".join(f"{int.from_bytes(raw[i : i + 8], 'little'):016x}" for i in range(0, 32, 8))


def _shard_files(data: bytes) -> dict[str, tuple[str, int]]:
    """sha256 -> (Xet file hash, size) of the files an MDB shard records (the Xet shard format:
    a 48-byte header, a footer naming the file-info and CAS-info sections; per file a 48-byte header,
    its segments, optional verification entries, and a metadata extension holding the sha256)."""
    footer_size = struct.unpack_from("<Q", data, 40)[0]
    footer = data[len(data) - footer_size :]
    _, file_info, cas_info = struct.unpack_from("<QQQ", footer, 0)
    found, pos = {}, file_info
    while pos < cas_info:
        file_hash = data[pos : pos + 32]
        flags, entries = struct.unpack_from("<II", data, pos + 32)
        pos += 48
        if file_hash == b"\xff" * 32:
            break
        size = sum(struct.unpack_from("<I", data, pos + 48 * i + 36)[0] for i in range(entries))
        pos += 48 * entries
        if flags & (1 << 31):
            pos += 48 * entries
        if flags & (1 << 30):
            found[_xet_hex(data[pos : pos + 32])] = (_xet_hex(file_hash), size)
            pos += 48
    return found


class LocalHub:
    """Start with `with LocalHub(root, users) as hub:`; `hub.url` is the endpoint."""

    def __init__(self, root: Path, tokens: dict[str, dict], port: int = 0):
        self.root = Path(root)
        (self.root / "blobs").mkdir(parents=True, exist_ok=True)
        self.tokens = tokens  # token -> {"name": user, "orgs": [org, ...]}
        self.repos: RepoTable = RepoTable()
        self.log: list[dict] = []
        self.fail_next_commit = False
        # "landed-then-504": the commit is made, then the answer is a gateway timeout (as after 60 s);
        # "quota": 403 private storage limit; "500": a server error with nothing committed
        self.commit_faults: list[str] = []
        self.rate_limits: dict[str, list] = {}  # "api" / "resolvers" -> [requests still refused, reset s]
        self.cas_dir = self.root / "cas"  # the local Xet CAS that xet-write-token hands out
        # sha256 -> (xet file hash, size, CAS folder), from CAS shards
        self.xet_files: dict[str, tuple[str, int, Path]] = {}
        self.job_time_scale = 1.0  # a job's timeout in seconds is this many seconds here
        self.job_stage_lag_s = 0.0  # how long after its log ends a job's stage still says RUNNING
        self.job_cwd: Path | None = None  # where a job runs: the working folder of its image
        self.flaky_every = 0  # cut every n-th ranged read of a weight file half-way (0: never)
        self.corrupt: dict[str, int] = {}  # "repo/path" -> offset of a byte flipped when served
        self.link = Link()
        self.link_per_job = False  # True: each job gets a line of its own at link.bytes_per_s (its machine's)
        self._job_links: dict[str, Link] = {}
        self.lfs_blobs: set[str] = set()  # blobs stored through LFS (shown with LFS metadata)
        self.announced: set[tuple[str, str]] = set()  # (repo, oid) a batch answer asked the client to PUT
        self._served_ranges = 0
        self.jobs: dict[str, Job] = {}
        self.on_commit = None  # called as on_commit(repo_id, revision, paths, agent) after a commit lands
        self.lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", port), self._handler())
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        # the second origin that `resolve` redirects weight files to (the Hub's CAS bridge / CDN)
        self._cdn = ThreadingHTTPServer(("127.0.0.1", 0), self._cdn_handler())
        self._cdn.daemon_threads = True
        self.cdn_url = f"http://127.0.0.1:{self._cdn.server_address[1]}"

    def __enter__(self) -> LocalHub:
        for server in (self._server, self._cdn):
            threading.Thread(target=server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        for server in (self._server, self._cdn):
            server.shutdown()
            server.server_close()

    def rate_limit(self, kind: str, requests: int, reset_s: int = 1) -> None:
        """Answer the next `requests` requests of `kind` ("api" or "resolvers") with 429."""
        self.rate_limits[kind] = [requests, reset_s]

    def _limited(self, kind: str) -> int | None:
        """Seconds to announce when this request is rate-limited, else None."""
        with self.lock:
            left = self.rate_limits.get(kind)
            if not left or left[0] <= 0:
                return None
            left[0] -= 1
            return left[1]

    def _from_cas(self, sha256: str) -> bool:
        """Rebuild a file that a Xet upload put in the CAS (found by sha256 in its shards) as a blob."""
        if sha256 not in self.xet_files:
            for cas in self.cas_dirs():
                for shard in (cas / "xet" / "xorbs" / "shards").glob("*.mdb"):
                    for sha, (xet_hash, size) in _shard_files(shard.read_bytes()).items():
                        self.xet_files[sha] = (xet_hash, size, cas)
        if sha256 not in self.xet_files:
            return False
        if not (self.root / "blobs" / sha256).exists():
            xet_hash, size, cas = self.xet_files[sha256]
            target = self.root / "blobs" / f".xet-{sha256}"
            for attempt in range(50):  # the uploading process may hold the local CAS's database a moment
                try:
                    _download_from_cas(cas, xet_hash, size, target)
                    break
                except RuntimeError as exc:
                    if "lock" not in str(exc).lower() or attempt == 49:
                        raise
                    time.sleep(0.1)
            digest = hashlib.sha256()
            with open(target, "rb") as f:
                while data := f.read(IO_CHUNK * 16):
                    digest.update(data)
            if digest.hexdigest() != sha256:
                target.unlink()
                return False
            os.replace(target, self.root / "blobs" / sha256)
        self.lfs_blobs.add(sha256)
        self.log.append({"method": "XET", "path": f"/cas/{sha256}", "range": None, "bytes": 0, "token": None})
        return True

    def cas_bytes(self) -> int:
        """Bytes the Xet uploads stored in the CAS (xorbs): a rerun that sends nothing again adds none."""
        return sum(
            p.stat().st_size
            for cas in self.cas_dirs()
            for p in (cas / "xet" / "xorbs" / "xorbs").glob("*")
            if p.is_file()
        )

    def cas_dirs(self) -> list[Path]:
        """The local CAS folders: the default one, and one per Job process (a local CAS is one process's:
        its database takes a lock; the real Xet service is shared by all)."""
        return [self.cas_dir, *sorted(self.root.glob("cas-job-*"))]

    def cas_for(self, agent: str) -> Path:
        job = agent.split("origin/job-")[-1].split(";")[0].strip() if "origin/job-" in agent else None
        return self.root / f"cas-job-{job}" if job else self.cas_dir

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

    def link_for(self, agent: str) -> Link:
        """The line a request travels: the shared one, or with `link_per_job` the requesting job's own."""
        if self.link_per_job and "origin/job-" in agent:
            job = agent.split("origin/job-")[-1].split(";")[0].strip()
            with self.lock:
                if job not in self._job_links:
                    self._job_links[job] = Link(self.link.bytes_per_s)
                return self._job_links[job]
        return self.link

    def _blob_from_stream(self, read, length: int, link: Link | None = None) -> str:
        """Store `length` bytes read in chunks from `read` (passed through the link); their sha256."""
        link = link or self.link
        digest = hashlib.sha256()
        with tempfile.NamedTemporaryFile(dir=self.root / "blobs", delete=False) as tmp:
            left = length
            while left:
                data = read(min(IO_CHUNK, left))
                if not data:
                    break
                link.pass_bytes("up", len(data))
                digest.update(data)
                tmp.write(data)
                left -= len(data)
        final = self.root / "blobs" / digest.hexdigest()
        os.replace(tmp.name, final)
        return digest.hexdigest()

    def add_large_file(self, repo_id: str, path: str, head: bytes, size: int) -> None:
        """Commit a file of `size` bytes that starts with `head` and is zeros after, stored sparse.

        It stands in for the real Hub's huge files (a 141 GB checkpoint) in tests that only look at
        them — the tree listing, a header read by range — and must refuse to read them whole. Its
        recorded sha256 is a name, not the hash of its bytes: a test that streams it all is wrong.
        """
        digest = hashlib.sha256(head + str(size).encode()).hexdigest()
        blob = self.root / "blobs" / digest
        with open(blob, "wb") as f:
            f.write(head)
            f.truncate(size)
        repo = self.repos[repo_id]
        self.lfs_blobs.add(digest)
        self._commit(repo, {**repo.head[1], path: digest}, f"Add {path}")

    def _commit(self, repo: Repo, files: dict[str, str], message: str = "", branch: str = "main") -> str:
        history = repo.history(branch)
        sha = hashlib.sha1(f"{time.time_ns()}{len(history)}{sorted(files.items())}".encode()).hexdigest()
        history.append((sha, files, message))
        return sha

    def _upload_mode(self, repo: Repo, path: str, size: int) -> str:
        """lfs for large files and for paths the repo's .gitattributes sends to LFS, else regular."""
        if size >= LFS_THRESHOLD:
            return "lfs"
        blob = repo.head[1].get(".gitattributes")
        rules = (self.root / "blobs" / blob).read_text() if blob else ""
        for line in rules.splitlines():
            pattern, *attributes = line.split()
            if "filter=lfs" in attributes and fnmatch.fnmatch(path.rsplit("/", 1)[-1], pattern):
                return "lfs"
        return "regular"

    def _snapshot(self, repo: Repo, revision: str) -> tuple[str, dict[str, str], str] | None:
        if revision in ("main", "HEAD"):
            return repo.head
        if revision in repo.branches:
            return repo.branches[revision][-1]
        every = [*repo.commits, *(c for history in repo.branches.values() for c in history)]
        return next((c for c in every if c[0] == revision), None)

    # ---- HTTP -------------------------------------------------------------------------------
    def _handler(self):
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def _user(self) -> dict | None:
                auth = self.headers.get("Authorization", "")
                user = hub.tokens.get(auth.removeprefix("Bearer ").strip()) if auth else None
                if user is not None and user.get("expires_at") and user["expires_at"] < time.time():
                    return None  # an expired OAuth token is no token
                return user

            def _lacks_scope(self, user: dict | None, scope: str) -> bool:
                """True after answering 403 when the token was not granted `scope` (OAuth / fine-grained)."""
                if user is None or scope in user.get("scopes", ALL_SCOPES):
                    return False
                self._error(
                    403,
                    f"This token lacks the '{scope}' scope (granted: {' '.join(sorted(user['scopes']))}).",
                    "InsufficientScope",
                )
                return True

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

            def _error(
                self, status: int, message: str, code: str | None = None, headers: dict | None = None, **extra
            ):
                headers = {"X-Error-Message": message, **(headers or {})}
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
                    if (
                        user is None
                        or not _member(user, repo_id)
                        or "read-repos" not in user.get("scopes", ALL_SCOPES)
                    ):
                        return None
                return repo

            def _gate(self, repo_id: str, repo: Repo) -> bool:
                """True after answering 403 when a gated repo's file is asked by someone not granted it."""
                user = self._user()
                scopes = user.get("scopes", ALL_SCOPES) if user else set()
                if not repo.gated or (
                    user is not None
                    and (
                        _member(user, repo_id)
                        or (user["name"] in repo.granted and scopes & {"gated-repos", "read-repos"})
                    )
                ):
                    return False
                self._error(
                    403 if user else 401,
                    f"Access to model {repo.name} is restricted. You must have access to it and be authenticated "
                    "to access it.",
                    "GatedRepo",
                )
                return True

            def _canonical(self, parts: list[str]) -> str | None:
                """The path with a repo id spelled as the Hub stores it, when the request spelled it otherwise."""
                if parts[:2] == ["api", "models"] and len(parts) >= 4:
                    at = 2
                elif len(parts) >= 3 and parts[2] == "resolve":
                    at = 0
                else:
                    return None
                repo = hub.repos.get(f"{parts[at]}/{parts[at + 1]}")
                if repo is None or repo.name == f"{parts[at]}/{parts[at + 1]}":
                    return None
                fixed = [*parts[:at], *repo.name.split("/"), *parts[at + 2 :]]
                query = urlparse(self.path).query
                return "/" + "/".join(fixed) + (f"?{query}" if query else "")

            def _dispatch(self):
                parsed = urlparse(self.path)
                path = unquote(parsed.path)
                self.entry = _log_request(hub, self, path)
                parts = path.strip("/").split("/")
                if self.command == "PUT" and parts[0] == "lfs-upload":  # streamed to disk, outside the lock
                    return self._lfs_put("/".join(parts[1:3]), parts[3])
                self.body = self._body()  # always consume it: keep-alive connections carry the next request
                resolve = len(parts) >= 5 and parts[2] == "resolve" and self.command in ("GET", "HEAD")
                if parts[0] == "api" or resolve:
                    wait = hub._limited("resolvers" if resolve else "api")
                    if wait is not None:
                        kind = "resolvers" if resolve else "api"
                        return self._error(
                            429,
                            "Too Many Requests",
                            headers={
                                "RateLimit": f'"{kind}";r=0;t={wait}',
                                "RateLimit-Policy": f'"fixed window";"{kind}";q=500;w=300',
                                "Retry-After": str(wait),
                            },
                        )
                with hub.lock:
                    canonical = self._canonical(parts)
                if canonical is not None:  # the Hub answers other spellings of a repo id with a redirect
                    return self._send(307, b"", {"Location": canonical})
                if resolve:
                    with hub.lock:
                        found = self._resolve_lookup(f"{parts[0]}/{parts[1]}", parts[3], "/".join(parts[4:]))
                    return None if found is None else self._serve_or_redirect(*found)
                if parts == ["api", "jobs", "hardware"]:
                    return self._send(200, JOB_HARDWARE)
                if parts[:2] == ["api", "jobs"] and len(parts) >= 3:
                    return self._jobs(parts[2], parts[3:])
                with hub.lock:
                    if path == "/_admin/link" and self.command == "POST":
                        settings = json.loads(self.body or b"{}")
                        hub.link.bytes_per_s = float(settings.get("bytes_per_s") or 0) or None
                        hub.link_per_job = bool(settings.get("per_job"))
                        hub._job_links.clear()
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
                        return self._validate_yaml()
                    if parts[:2] == ["api", "models"] and len(parts) >= 4:
                        repo_id = f"{parts[2]}/{parts[3]}"
                        rest = parts[4:]
                        if not rest:
                            return self._info(repo_id, "main")
                        if rest[0] == "xet-write-token":
                            return self._xet_write_token(repo_id)
                        if rest[0] == "commits":
                            return self._commits(repo_id, "/".join(rest[1:]) or "main")
                        if rest[0] == "revision":
                            return self._info(repo_id, "/".join(rest[1:]))
                        if rest[0] == "preupload":
                            return self._preupload(repo_id)
                        if rest[0] == "commit":
                            return self._commit(repo_id, "/".join(rest[1:]) or "main")
                        if rest[0] == "branch" and len(rest) >= 2:
                            return self._branch(repo_id, "/".join(rest[1:]))
                        if rest[0] == "paths-info":
                            return self._paths_info(repo_id, "/".join(rest[1:]) or "main")
                        if rest == ["refs"]:
                            return self._refs(repo_id)
                        if rest[0] == "tree":
                            return self._tree(repo_id, rest[1], "/".join(rest[2:]))
                self._error(404, f"no route for {self.command} {path}")

            do_GET = do_POST = do_HEAD = do_DELETE = do_PUT = lambda self: self._dispatch()

            # ---- Jobs: submit, inspect, logs (server-sent events), cancel ----------------------------------
            def _jobs(self, namespace: str, rest: list[str]):
                user = self._user()
                if user is None:
                    return self._error(401, "Invalid credentials in Authorization header")
                if not _member(user, f"{namespace}/x"):
                    return self._error(403, f"You cannot run or see Jobs in the namespace {namespace}")
                if self._lacks_scope(user, "jobs"):
                    return None
                if not rest and self.command == "POST":
                    return self._send(200, self._start_job(namespace, json.loads(self.body or b"{}")).info())
                if not rest and self.command == "GET":  # listed, filtered by label=k=v and stage
                    query = parse_qs(urlparse(self.path).query)
                    labels = dict(item.split("=", 1) for item in query.get("label", []))
                    stages = set(query.get("stage", []))
                    listed = [
                        job.info()
                        for job in hub.jobs.values()
                        if job.namespace == namespace
                        and all((job.spec.get("labels") or {}).get(k) == v for k, v in labels.items())
                        and (not stages or job.stage in stages)
                    ]
                    return self._send(200, listed)
                job = hub.jobs.get(rest[0]) if rest else None
                if job is None or job.namespace != namespace:
                    return self._error(404, "Job not found")
                if len(rest) == 1:
                    return self._send(200, job.info())
                if rest[1] == "cancel" and self.command == "POST":
                    if job.stage == "RUNNING" and job.proc is not None:
                        job.stage, job.message = "CANCELED", "Job canceled by the user"
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
                    "HF_HUB_USER_AGENT_ORIGIN": f"job-{job.id}",  # tells the jobs' requests apart in the log
                }
                job.proc = subprocess.Popen(
                    command,
                    cwd=hub.job_cwd,  # the image's working folder (None: this one)
                    env=job.env,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                    text=True,
                    bufsize=1,
                )

                def follow():
                    for line in job.proc.stdout:
                        job.lines.append((_now(), line.rstrip("\n")))
                    job.output_done = True
                    code = job.proc.wait()
                    time.sleep(hub.job_stage_lag_s)  # the log can end before the stage says so
                    if job.stage == "RUNNING":
                        job.stage = "COMPLETED" if code == 0 else "ERROR"
                        job.message = None if code == 0 else f"Job failed with exit code: {code}"

                def stop_at_timeout():
                    try:
                        job.proc.wait(timeout=job.timeout_s * hub.job_time_scale)
                    except subprocess.TimeoutExpired:
                        if job.stage == "RUNNING":
                            job.stage, job.message = "ERROR", "Job timeout"
                            job.proc.kill()

                job.timeout_s = float(spec.get("timeoutSeconds") or 30 * 60)
                threading.Thread(target=follow, daemon=True).start()
                threading.Thread(target=stop_at_timeout, daemon=True).start()
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
                        finished = job.output_done or job.stage != "RUNNING"
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
                        "auth": (
                            {
                                "type": "oauth",
                                "expiresAt": user.get("expires_at"),
                                "scope": " ".join(sorted(user["scopes"])),
                            }
                            if "scopes" in user
                            else {
                                "type": "access_token",
                                "accessToken": {"displayName": "test", "role": "write"},
                            }
                        ),
                    },
                )

            def _create(self):
                user = self._user()
                if user is None:
                    return self._error(401, "Invalid credentials in Authorization header")
                if self._lacks_scope(user, "manage-repos"):
                    return None
                payload = json.loads(self.body or b"{}")
                namespace = payload.get("organization") or user["name"]
                repo_id = f"{namespace}/{payload['name']}"
                if not _member(user, repo_id):
                    return self._error(403, f"You don't have the rights to create a model under {namespace}")
                if repo_id in hub.repos:  # whatever the case of its letters
                    existing = hub.repos[repo_id].name
                    return self._error(
                        409, "You already created this model repo", url=f"{hub.url}/{existing}"
                    )
                repo = Repo(
                    private=bool(payload.get("private")) or payload.get("visibility") == "private",
                    name=repo_id,
                )
                hub._commit(
                    repo, {".gitattributes": hub._blob(DEFAULT_GITATTRIBUTES.encode())}, "initial commit"
                )
                hub.repos[repo_id] = repo
                self._send(200, {"url": f"{hub.url}/{repo_id}", "name": repo_id, "id": repo_id})

            def _delete(self):
                user = self._user()
                payload = json.loads(self.body or b"{}")
                repo_id = f"{payload.get('organization') or (user or {}).get('name')}/{payload['name']}"
                if user is None or repo_id not in hub.repos:
                    return self._error(404, "Repository not found", "RepoNotFound")
                if self._lacks_scope(user, "manage-repos"):
                    return None
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
                        agent = self.headers.get("User-Agent") or ""
                        if (
                            "origin/job-" in agent
                        ):  # a presigned URL carries no headers of the job's: say whose
                            href += "?job=" + agent.split("origin/job-")[-1].split(";")[0].strip()
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
                job = parse_qs(urlparse(self.path).query).get("job", [""])[0]
                agent = f"origin/job-{job}" if job else self.headers.get("User-Agent") or ""
                self.entry["agent"] = agent
                digest = hub._blob_from_stream(self.rfile.read, length, hub.link_for(agent))
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
                repo, (sha, files, _) = found
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
                        "gated": "auto" if repo.gated else False,
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
                if user is None or not _member(user, repo_id):
                    self._error(401, "Invalid credentials in Authorization header")
                    return None
                if self._lacks_scope(user, "write-repos"):
                    return None
                repo = hub.repos.get(repo_id)
                if repo is None:
                    self._error(404, "Repository not found", "RepoNotFound")
                return repo

            def _preupload(self, repo_id: str):
                payload = json.loads(self.body or b"{}")
                if self._writable(repo_id) is None:
                    return None
                repo = hub.repos[repo_id]
                files = [
                    {
                        "path": f["path"],
                        "uploadMode": hub._upload_mode(repo, f["path"], int(f.get("size") or 0)),
                        "shouldIgnore": False,
                        "oid": None,
                    }
                    for f in payload.get("files", [])
                ]
                self._send(200, {"files": files, "commitOid": hub.repos[repo_id].head[0]})

            def _branch(self, repo_id: str, branch: str):
                """Create a branch from main's head (POST) or delete it (DELETE), as the Hub's branch API does."""
                repo = self._writable(repo_id)
                if repo is None:
                    return None
                if self.command == "POST":
                    if branch in repo.branches or branch == "main":
                        return self._error(409, f"Reference {branch} already exists")
                    repo.branches[branch] = [repo.head]
                    return self._send(200, {})
                if self.command == "DELETE":
                    if repo.branches.pop(branch, None) is None:
                        return self._error(404, f"Invalid rev id: {branch}", "RevisionNotFound")
                    return self._send(200, {})
                return self._error(405, "Method not allowed")

            def _refs(self, repo_id: str):
                repo = self._visible(repo_id)
                if repo is None:
                    return self._error(404, "Repository not found", "RepoNotFound")
                heads = {"main": repo.head, **{name: history[-1] for name, history in repo.branches.items()}}
                branches = [
                    {"name": n, "ref": f"refs/heads/{n}", "targetCommit": c[0]} for n, c in heads.items()
                ]
                return self._send(200, {"branches": branches, "converts": [], "tags": []})

            def _paths_info(self, repo_id: str, revision: str):
                """The entries of the named paths at a revision (what a copy between revisions reads first)."""
                found = self._lookup(repo_id, revision)
                if found is None:
                    return None
                _, snapshot = found
                form = parse_qs(self.body.decode()) if self.body else {}
                paths = form.get("paths", [])
                entries = [self._entry(path, snapshot[1][path]) for path in paths if path in snapshot[1]]
                return self._send(200, entries)

            def _commit(self, repo_id: str, revision: str = "main"):
                body = self.body
                repo = self._writable(repo_id)
                if repo is None:
                    return None
                if revision not in ("main", "HEAD") and revision not in repo.branches:
                    return self._error(404, f"Invalid rev id: {revision}", "RevisionNotFound")
                if hub.fail_next_commit:
                    hub.fail_next_commit = False
                    return self._error(400, "Simulated failure while committing (test)")
                fault = hub.commit_faults.pop(0) if hub.commit_faults else None
                if fault == "quota":
                    return self._error(
                        403,
                        "Private repository storage limit reached, please upgrade your plan to increase your "
                        "private storage limit or make the repository public.",
                    )
                if fault == "500":
                    return self._error(
                        500, "Internal Error - We're working hard to fix this as soon as possible!"
                    )
                files = dict(repo.history(revision)[-1][1])
                head = repo.history(revision)[-1][0]
                summary = ""
                for line in body.decode().splitlines():
                    if not line.strip():
                        continue
                    item = json.loads(line)
                    value = item["value"]
                    if item["key"] == "header":
                        if value.get("parentCommit") not in (None, head):
                            return self._error(
                                412, "A commit has happened since. Please refresh and try again."
                            )
                        summary = value.get("summary", "")
                        if value.get("description"):
                            summary += "\n\n" + value["description"]
                    elif item["key"] == "file":
                        files[value["path"]] = hub._blob(base64.b64decode(value["content"]))
                    elif item["key"] == "lfsFile":
                        if value["oid"] not in repo.lfs and hub._from_cas(value["oid"]):
                            repo.lfs.add(value["oid"])  # uploaded through Xet: rebuilt from the CAS
                        if value["oid"] not in repo.lfs:
                            return self._error(
                                422, f"LFS object {value['oid']} of {value['path']} was never uploaded"
                            )
                        files[value["path"]] = value["oid"]
                    elif item["key"] == "deletedFile":
                        files.pop(value["path"], None)
                    else:
                        return self._error(400, f"unsupported commit operation {item['key']} in the test hub")
                sha = hub._commit(repo, files, summary, branch=revision)
                if hub.on_commit is not None:
                    changed = [
                        json.loads(line)["value"].get("path")
                        for line in body.decode().splitlines()
                        if line.strip()
                    ]
                    hub.on_commit(
                        repo_id, revision, [p for p in changed if p], self.headers.get("User-Agent") or ""
                    )
                if fault == "landed-then-504":  # the commit is made; the answer never arrives in time
                    return self._error(504, "Gateway Timeout")
                self._send(
                    200,
                    {
                        "commitUrl": f"{hub.url}/{repo_id}/commit/{sha}",
                        "commitOid": sha,
                        "commitMessage": summary,
                    },
                )

            def _validate_yaml(self):
                """Card metadata as the Hub checks it: a YAML mapping whose base_model names models it holds."""
                import yaml

                content = json.loads(self.body or b"{}").get("content", "")
                errors = []
                if content.startswith("---"):
                    try:
                        meta = yaml.safe_load(content.split("---", 2)[1]) or {}
                    except yaml.YAMLError as exc:
                        meta, errors = {}, [{"message": f"YAML is invalid: {exc}"}]
                    if not isinstance(meta, dict):
                        meta, errors = {}, [{"message": "metadata must be a YAML mapping"}]
                    base = meta.get("base_model") or []
                    for name in [base] if isinstance(base, str) else base:
                        if not isinstance(name, str) or name not in hub.repos:
                            errors.append(
                                {"message": f'"base_model" with value "{name}" is not a valid model id'}
                            )
                if errors:
                    return self._send(400, {"errors": errors, "warnings": []})
                return self._send(200, {"errors": [], "warnings": []})

            def _xet_write_token(self, repo_id: str):
                """A short-lived Xet write token for a local CAS folder (hf_xet's local:// endpoint)."""
                if self._writable(repo_id) is None:
                    return None
                cas = hub.cas_for(self.headers.get("User-Agent") or "")
                cas.mkdir(exist_ok=True)
                expires = int(time.time()) + 3600
                info = {"casUrl": f"local://{cas}", "accessToken": "xet-local-token", "exp": expires}
                headers = {
                    "X-Xet-Cas-Url": info["casUrl"],
                    "X-Xet-Access-Token": info["accessToken"],
                    "X-Xet-Token-Expiration": str(expires),
                }
                return self._send(200, info, headers)

            def _commits(self, repo_id: str, revision: str):
                found = self._lookup(repo_id, revision)
                if found is None:
                    return None
                repo, (head, _, _) = found
                shas = [c[0] for c in repo.commits]
                listing = [
                    {
                        "id": sha,
                        "title": message.split("\n", 1)[0],
                        "message": message.split("\n\n", 1)[1] if "\n\n" in message else "",
                        "authors": [{"user": repo.name.split("/")[0]}],
                        "date": "2026-12-01T00:00:00.000Z",
                    }
                    for sha, _, message in reversed(repo.commits[: shas.index(head) + 1])
                ]
                return self._send(200, listing)

            def _tree(self, repo_id: str, revision: str, prefix: str):
                found = self._lookup(repo_id, revision)
                if found is None:
                    return None
                _, snap = found
                self._send(
                    200, [self._entry(p, b) for p, b in sorted(snap[1].items()) if p.startswith(prefix)]
                )

            def _entry(self, path: str, blob: str) -> dict:
                """A file as the tree and paths-info APIs describe it."""
                sib = self._sibling(path, blob)
                entry = {"type": "file", "path": path, "oid": sib["blobId"], "size": sib["size"]}
                if "lfs" in sib:
                    entry["lfs"] = {"oid": blob, "size": sib["size"], "pointerSize": 134}
                return entry

            def _resolve_lookup(self, repo_id: str, revision: str, filename: str):
                found = self._lookup(repo_id, revision)
                if found is None:
                    return None
                repo, (sha, files, _) = found
                if self._gate(repo_id, repo):
                    return None
                if filename not in files:
                    self._error(404, f"Entry not found: {filename}", "EntryNotFound")
                    return None
                return repo_id, sha, filename, files[filename]

            def _file_headers(self, sha: str, blob: str) -> dict:
                headers = {"X-Repo-Commit": sha, "ETag": f'"{blob}"'}
                if blob in hub.lfs_blobs:
                    size = (hub.root / "blobs" / blob).stat().st_size
                    headers |= {"X-Linked-Etag": f'"{blob}"', "X-Linked-Size": str(size)}
                return headers

            def _serve_or_redirect(self, repo_id: str, sha: str, filename: str, blob: str):
                """Files stored in git are sent from here; LFS/Xet files by a 302 to the CDN, as on the Hub."""
                headers = self._file_headers(sha, blob)
                if blob not in hub.lfs_blobs:
                    return _serve_file(self, hub, repo_id, sha, filename, blob, headers)
                with hub.lock:
                    signature = hashlib.sha256(f"{blob}{repo_id}/{filename}".encode()).hexdigest()[:16]
                location = f"{hub.cdn_url}/{blob}?repo={repo_id}&file={filename}&sig={signature}"
                self._send(302, b"", {**headers, "Location": location, "Content-Length": "0"})
                return None

        return Handler

    def _cdn_handler(self):
        """The second origin: serves blobs by signed URL with Range, and refuses Authorization headers
        (as a CDN or an S3 presigned URL does: the client must drop them on a cross-origin redirect)."""
        hub = self

        class CdnHandler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

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

            def _dispatch(self):
                parsed = urlparse(self.path)
                query = parse_qs(parsed.query)
                blob = parsed.path.strip("/")
                self.entry = _log_request(hub, self, f"cdn:{parsed.path}")
                if self.headers.get("Authorization"):
                    return self._send(
                        400,
                        b"<Error><Code>InvalidArgument</Code><Message>Only one auth mechanism allowed"
                        b"</Message></Error>",
                        content_type="application/xml",
                    )
                repo_id, filename = query.get("repo", [""])[0], query.get("file", [""])[0]
                wait = hub._limited("resolvers")
                if wait is not None:
                    return self._send(429, b"Too Many Requests", {"Retry-After": str(wait)}, "text/plain")
                signature = hashlib.sha256(f"{blob}{repo_id}/{filename}".encode()).hexdigest()[:16]
                if query.get("sig", [""])[0] != signature or not (hub.root / "blobs" / blob).is_file():
                    return self._send(
                        403, b"<Error><Code>AccessDenied</Code></Error>", content_type="application/xml"
                    )
                return _serve_file(self, hub, repo_id, "", filename, blob, {"ETag": f'"{blob}"'})

            do_GET = do_HEAD = lambda self: self._dispatch()

        return CdnHandler


def _serve_file(self, hub: LocalHub, repo_id: str, sha: str, filename: str, blob: str, headers: dict):
    """Send a file (or the asked range) from disk in chunks, through the link and the test faults."""
    path = hub.root / "blobs" / blob
    size = path.stat().st_size
    headers = {**headers, "Accept-Ranges": "bytes"}
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
    if status == 206 and self.command == "GET" and filename.endswith(".safetensors") and length > 4096:
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
    link = hub.link_for(self.headers.get("User-Agent") or "")
    with open(path, "rb") as f:
        f.seek(start)
        while sent < length:
            data = bytearray(f.read(min(IO_CHUNK, length - sent)))
            if flip is not None and start + sent <= flip < start + sent + len(data):
                data[flip - start - sent] ^= 0xFF
            if cut_at is not None and sent + len(data) > cut_at:
                data = data[: cut_at - sent]
            link.pass_bytes("down", len(data))
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
