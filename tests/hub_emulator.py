"""A small Hugging Face Hub-compatible HTTP server for the test suite.

The machine that runs the tests cannot reach huggingface.co, yet the project must prove that
the *real* ``huggingface_hub`` / ``datasets`` / ``transformers`` clients can publish and read
back its artefacts. This module speaks just enough of the Hub protocol for those clients:
repositories (models, datasets, spaces) with branches and tags, atomic NDJSON commits, the git
LFS batch API for large files, ``resolve`` downloads with Range requests, and the error headers
(``X-Error-Code``) the clients turn into typed exceptions.

Usage::

    with HubEmulator(tmp_path, token="hf_test_token") as hub:
        env = {"HF_ENDPOINT": hub.endpoint, "HF_HUB_DISABLE_XET": "1", ...}

Only the standard library is used (plus ``yaml`` for README metadata when it is installed).
State lives under the given folder: ``objects/`` holds content-addressed blobs (git sha1 for
regular files, sha256 for LFS objects) and ``repos/{type}s/{ns}/{name}/state.json`` holds each
repository's commits and refs. A commit writes its blobs first, then swaps in the new state file
with ``os.replace``, so a failed commit leaves the repository exactly as it was.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import shutil
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

try:  # README metadata is YAML; fall back to a tiny parser when PyYAML is missing.
    import yaml
except ImportError:  # pragma: no cover - yaml is installed in the test environment
    yaml = None

REPO_TYPES = {"models": "model", "datasets": "dataset", "spaces": "space"}
URL_PREFIX = {"model": "", "dataset": "datasets/", "space": "spaces/"}
LFS_SUFFIXES = (".safetensors", ".parquet", ".bin", ".png", ".pt", ".pth", ".ckpt", ".h5",
                ".onnx", ".arrow", ".npy", ".npz", ".pkl", ".jpg", ".jpeg", ".zip", ".gz", ".msgpack")
LFS_THRESHOLD = 10 * 1024 * 1024  # the Hub refuses regular (non-LFS) files above 10 MB
CHUNK = 1024 * 1024
GITATTRIBUTES = "".join(f"*{s} filter=lfs diff=lfs merge=lfs -text\n" for s in LFS_SUFFIXES).encode()
INVALID_CREDENTIALS = "Invalid credentials in Authorization header"


class HubError(Exception):
    """An HTTP error answer; `code` becomes `X-Error-Code`, which the clients map to exceptions."""

    def __init__(self, status: int, message: str, code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.headers = status, message, code, headers or {}


def now_iso() -> str:
    t = time.time()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t % 1 * 1000):03d}Z"


def git_blob_sha1(data: bytes) -> str:
    """The id git gives a blob; the Hub uses it as ETag and `oid` of regular files."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lfs_pointer(sha256: str, size: int) -> bytes:
    """The pointer file git stores in place of an LFS object (its sha1 is the tree `oid`)."""
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


def parse_front_matter(text: str):
    """README.md YAML metadata, parsed like `huggingface_hub.ModelCard` does (None if absent).

    Raises ValueError on invalid YAML so that validate-yaml can report it.
    """
    match = re.match(r"^\s*---[ \t]*\r?\n([\s\S]*?)\r?\n---[ \t]*(\r?\n|$)", text)
    if match is None:
        # an empty block ("---\n---") is valid too
        return {} if re.match(r"^\s*---[ \t]*\r?\n---[ \t]*(\r?\n|$)", text) else None
    block = match.group(1)
    if yaml is not None:
        try:
            data = yaml.safe_load(block)
        except yaml.YAMLError as err:
            raise ValueError(f"Invalid YAML in README.md metadata: {err}") from err
    else:
        data = _minimal_yaml(block)
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError("README.md metadata must be a YAML mapping")  # noqa: TRY004 (callers catch ValueError)
    return data


def _minimal_yaml(block: str) -> dict:
    """Flat `key: value` and `key:\n- item` lists only; enough for simple cards without PyYAML."""
    data, key = {}, None
    for line in block.splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        if line.lstrip().startswith("- ") and key is not None:
            data.setdefault(key, [])
            if isinstance(data[key], list):
                data[key].append(line.lstrip()[2:].strip().strip("'\""))
        elif ":" in line and not line.startswith(" "):
            key, _, value = line.partition(":")
            key, value = key.strip(), value.strip().strip("'\"")
            data[key] = value if value else None
    return data


def wants_lfs(path: str, size: int, sample: bytes) -> bool:
    """Upload mode the Hub would pick: LFS for binaries, big files and data/weight suffixes."""
    return path.lower().endswith(LFS_SUFFIXES) or size > LFS_THRESHOLD or b"\0" in sample


class HubEmulator:
    """A Hub-compatible server on 127.0.0.1 (random port), run in a background thread.

    Attributes usable from tests:
      endpoint: ``http://127.0.0.1:PORT`` to put in ``HF_ENDPOINT``.
      fail_next_lfs_upload: set True to make the next LFS ``PUT`` fail (403), for atomicity tests.
      requests: ``(method, path, status)`` of every request served, to debug client flows.
      unhandled: requests that matched no route (a client used an endpoint we lack).

    ``token`` reads and writes as ``user``; ``read_token`` is the same user's read-only token.
    """

    def __init__(self, root, token: str = "hf_test_token", user: str = "test-user",
                 read_token: str = "hf_read_token"):
        self.root = Path(root)
        self.token, self.user, self.read_token = token, user, read_token
        self.fail_next_lfs_upload = False
        self.requests: list[tuple[str, str, int]] = []
        self.unhandled: list[tuple[str, str]] = []
        self._lock = threading.RLock()  # serialises every state change (commits, refs, repos)
        self._server = None
        self._thread = None
        for sub in ("objects/git", "objects/lfs", "repos", "tmp"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)

    # -- lifecycle -------------------------------------------------------------------------
    def start(self) -> HubEmulator:
        handler = type("BoundHubHandler", (HubHandler,), {"hub": self})
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="hub-emulator", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._thread.join(timeout=5)
            self._server = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    # -- storage ---------------------------------------------------------------------------
    def _repo_dir(self, repo_type: str, repo_id: str) -> Path:
        return self.root / "repos" / f"{repo_type}s" / repo_id

    def load(self, repo_type: str, repo_id: str) -> dict | None:
        """Current state of a repo (commits, refs, visibility), or None if it does not exist."""
        try:
            return json.loads((self._repo_dir(repo_type, repo_id) / "state.json").read_text())
        except FileNotFoundError:
            return None

    def _save(self, repo_type: str, repo_id: str, state: dict) -> None:
        """Write the new state beside the old one, then swap: readers never see half a commit."""
        folder = self._repo_dir(repo_type, repo_id)
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f"state.json.{uuid.uuid4().hex}.tmp"
        tmp.write_text(json.dumps(state, indent=1))
        os.replace(tmp, folder / "state.json")

    def _object_path(self, kind: str, oid: str) -> Path:
        return self.root / "objects" / kind / oid[:2] / oid

    def _store_bytes(self, kind: str, oid: str, data: bytes) -> None:
        path = self._object_path(kind, oid)
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.root / "tmp" / uuid.uuid4().hex
            tmp.write_bytes(data)
            os.replace(tmp, path)

    def lfs_size(self, oid: str) -> int | None:
        path = self._object_path("lfs", oid)
        return path.stat().st_size if path.exists() else None

    def blob_path(self, entry: dict) -> Path:
        """Where the bytes of a tree entry live (LFS object or git blob)."""
        return self._object_path("lfs", entry["lfs"]) if "lfs" in entry else self._object_path("git", entry["oid"])

    # -- repos and refs --------------------------------------------------------------------
    def create_repo(self, repo_type: str, repo_id: str, private: bool = False) -> dict:
        with self._lock:
            if self.load(repo_type, repo_id) is not None:
                raise HubError(409, f"You already created this {repo_type} repo")
            state = {"id": repo_id, "type": repo_type, "private": bool(private), "createdAt": now_iso(),
                     "branches": {}, "tags": {}, "prs": 0, "commits": {}}
            # The Hub seeds every repo with a first commit holding .gitattributes.
            self._store_bytes("git", git_blob_sha1(GITATTRIBUTES), GITATTRIBUTES)
            entry = {"oid": git_blob_sha1(GITATTRIBUTES), "size": len(GITATTRIBUTES)}
            self._add_commit(state, "main", None, {".gitattributes": entry}, "initial commit", "")
            self._save(repo_type, repo_id, state)
            return state

    def delete_repo(self, repo_type: str, repo_id: str) -> None:
        with self._lock:
            if self.load(repo_type, repo_id) is None:
                raise HubError(404, "Repository not found", "RepoNotFound")
            shutil.rmtree(self._repo_dir(repo_type, repo_id))

    def _add_commit(self, state, branch, parent, files, title, message) -> str:
        date = now_iso()
        seed = json.dumps([parent, files, title, message, date, uuid.uuid4().hex], sort_keys=True)
        cid = hashlib.sha1(seed.encode()).hexdigest()
        state["commits"][cid] = {"parents": [parent] if parent else [], "title": title, "message": message,
                                 "date": date, "author": self.user, "files": files}
        state["branches"][branch] = cid
        state["lastModified"] = date
        return cid

    @staticmethod
    def resolve_rev(state: dict, rev: str) -> str:
        """Branch, tag, `refs/pr/N`, full or short (>=7) commit id -> commit id."""
        rev = (rev or "main").removeprefix("refs/heads/")
        for refs in (state["branches"], state["tags"]):
            if rev in refs:
                return refs[rev]
        if rev in state["commits"]:
            return rev
        if re.fullmatch(r"[0-9a-f]{7,40}", rev):
            matches = [cid for cid in state["commits"] if cid.startswith(rev)]
            if len(matches) == 1:
                return matches[0]
        raise HubError(404, f"Invalid rev id: {rev}", "RevisionNotFound")

    def history(self, state: dict, cid: str) -> list[str]:
        """First-parent ancestry, newest first."""
        out = []
        while cid:
            out.append(cid)
            parents = state["commits"][cid]["parents"]
            cid = parents[0] if parents else None
        return out

    # -- commits -----------------------------------------------------------------------------
    def commit(self, repo_type, repo_id, revision, lines, create_pr=False, endpoint=""):
        """Apply one NDJSON commit atomically: validate everything, then swap the state file."""
        header, ops = {}, []
        for line in lines:
            if line.get("key") == "header":
                header = line.get("value") or {}
            else:
                ops.append(line)
        with self._lock:
            state = self.load(repo_type, repo_id)
            if state is None:
                raise HubError(404, "Repository not found", "RepoNotFound")
            revision = unquote(revision or "main").removeprefix("refs/heads/")
            if create_pr:
                base = self.resolve_rev(state, revision)
                if header.get("parentCommit"):
                    base = self.resolve_rev(state, header["parentCommit"])
                state["prs"] += 1
                branch = f"refs/pr/{state['prs']}"
            elif revision in state["branches"]:
                branch, base = revision, state["branches"][revision]
                parent = header.get("parentCommit")
                if parent and not base.startswith(parent):
                    raise HubError(412, "A commit has happened since. Please refresh and try again.")
            elif revision in state["tags"] or re.fullmatch(r"[0-9a-f]{40}", revision):
                raise HubError(400, f"Cannot commit to '{revision}': it is not a branch")
            else:  # committing to a new branch name creates it from main
                branch, base = revision, state["branches"].get("main")
            files = dict(state["commits"][base]["files"]) if base else {}
            pending = []  # regular blobs to write once everything validated
            for op in ops:
                key, value = op.get("key"), op.get("value") or {}
                path = value.get("path", "")
                if key in ("file", "lfsFile"):
                    self._check_path(path)
                    if any(p == path or p.startswith(path + "/") for p in files if p != path):
                        raise HubError(400, f"'{path}' is a folder in the repository")
                if key == "file":
                    raw = value.get("content", "")
                    data = base64.b64decode(raw) if value.get("encoding") == "base64" else raw.encode()
                    oid = git_blob_sha1(data)
                    pending.append((oid, data))
                    files[path] = {"oid": oid, "size": len(data)}
                elif key == "lfsFile":
                    sha = value.get("oid", "")
                    size = self.lfs_size(sha)
                    if size is None or (value.get("size") is not None and value["size"] != size):
                        raise HubError(422, f"LFS object {sha} for '{path}' was not uploaded")
                    files[path] = {"oid": git_blob_sha1(lfs_pointer(sha, size)), "size": size, "lfs": sha}
                elif key == "deletedFile":
                    if path not in files:
                        raise HubError(404, f"A file with this name doesn't exist: {path}", "EntryNotFound")
                    del files[path]
                elif key == "deletedFolder":
                    prefix = path.rstrip("/") + "/"
                    doomed = [p for p in files if p.startswith(prefix)] if prefix != "/" else list(files)
                    if not doomed:
                        raise HubError(404, f"A folder with this name doesn't exist: {path}", "EntryNotFound")
                    for p in doomed:
                        del files[p]
                else:
                    raise HubError(400, f"Unknown commit operation: {key!r}")
            for oid, data in pending:
                self._store_bytes("git", oid, data)
            cid = self._add_commit(state, branch, base, files, header.get("summary") or "Commit",
                                   header.get("description") or "")
            self._save(repo_type, repo_id, state)
        url = f"{endpoint}/{URL_PREFIX[repo_type]}{repo_id}"
        result = {"success": True, "commitOid": cid, "commitUrl": f"{url}/commit/{cid}"}
        if create_pr:
            result["pullRequestUrl"] = f"{url}/discussions/{state['prs']}"
        return result

    @staticmethod
    def _check_path(path: str) -> None:
        parts = path.split("/")
        if not path or path.startswith("/") or any(p in ("", ".", "..") for p in parts) or parts[0] == ".git":
            raise HubError(400, f"Invalid path in repository: {path!r}")

    # -- listings ------------------------------------------------------------------------------
    @staticmethod
    def tree_entry(path: str, entry: dict) -> dict:
        out = {"type": "file", "oid": entry["oid"], "size": entry["size"], "path": path}
        if "lfs" in entry:
            out["lfs"] = {"oid": entry["lfs"], "size": entry["size"],
                          "pointerSize": len(lfs_pointer(entry["lfs"], entry["size"]))}
        return out

    @staticmethod
    def folder_entry(path: str, files: dict) -> dict:
        inside = sorted((p, e["oid"]) for p, e in files.items() if p.startswith(path + "/"))
        return {"type": "directory", "oid": hashlib.sha1(json.dumps(inside).encode()).hexdigest(),
                "size": 0, "path": path}

    @staticmethod
    def folders(files: dict) -> set[str]:
        return {"/".join(p.split("/")[:i]) for p in files for i in range(1, p.count("/") + 1)}

    def last_commits(self, state: dict, cid: str, paths: list[str]) -> dict[str, dict]:
        """Most recent commit that touched each path (file or folder), for `expand=true` listings."""
        found, todo = {}, set(paths)
        for c in self.history(state, cid):
            if not todo:
                break
            commit = state["commits"][c]
            parents = commit["parents"]
            before = state["commits"][parents[0]]["files"] if parents else {}
            changed = {p for p in set(before) | set(commit["files"]) if before.get(p) != commit["files"].get(p)}
            for path in list(todo):
                if path in changed or any(p.startswith(path + "/") for p in changed):
                    found[path] = {"id": c, "title": commit["title"], "date": commit["date"]}
                    todo.discard(path)
        return found


class HubHandler(BaseHTTPRequestHandler):
    """One request: parse, route to a `route_*` method, answer JSON or bytes."""

    hub: HubEmulator  # set on the subclass built by HubEmulator.start
    protocol_version = "HTTP/1.1"  # keep-alive: the clients reuse connections
    server_version = "HubEmulator/1.0"

    def log_message(self, format, *args):  # quiet: the test output stays readable
        pass

    # -- plumbing --------------------------------------------------------------------------------
    def do_GET(self):
        self._dispatch("GET")

    def do_HEAD(self):
        self._dispatch("HEAD")

    def do_POST(self):
        self._dispatch("POST")

    def do_PUT(self):
        self._dispatch("PUT")

    def do_DELETE(self):
        self._dispatch("DELETE")

    def _iter_body(self):
        """Request body chunks, for both Content-Length and chunked transfer encoding."""
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return
                yield self.rfile.read(size)
                self.rfile.readline()
        else:
            left = int(self.headers.get("Content-Length") or 0)
            while left > 0:
                data = self.rfile.read(min(left, CHUNK))
                if not data:
                    return
                left -= len(data)
                yield data

    def body(self) -> bytes:
        if self._body is None:
            self._body = b"".join(self._iter_body())
        return self._body

    def json_body(self) -> dict:
        try:
            return json.loads(self.body() or b"{}")
        except ValueError as err:
            raise HubError(400, f"Invalid JSON body: {err}")

    def _dispatch(self, method: str):
        self.method, self._body, self.status = method, None, 0
        url = urlsplit(self.path)
        self.query = parse_qs(url.query, keep_blank_values=True)
        # split before unquoting: revisions are sent quoted with safe="" (e.g. refs%2Fpr%2F1)
        segments = [unquote(s) for s in url.path.split("/")[1:]]
        try:
            try:
                handled = self.route(method, segments)
            finally:
                if self._body is None and method in ("POST", "PUT", "DELETE"):
                    self.body()  # always drain the body so keep-alive connections stay in sync
            if handled is False:
                self.hub.unhandled.append((method, self.path))
                raise HubError(404, f"Not found: {method} {url.path}")
        except HubError as err:
            self.send_json(err.status, {"error": err.message},
                           {**({"X-Error-Code": err.code} if err.code else {}),
                            "X-Error-Message": err.message, **err.headers})
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        except Exception as err:  # noqa: BLE001 - a bug in the emulator: answer 500 rather than hang the client
            self.send_json(500, {"error": f"emulator error: {type(err).__name__}: {err}"})
        self.hub.requests.append((method, url.path, self.status))

    def send_json(self, status: int, payload, headers: dict | None = None):
        data = json.dumps(payload).encode()
        self.status = status
        self.send_response(status)
        self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if self.method != "HEAD":
            self.wfile.write(data)

    # -- auth ----------------------------------------------------------------------------------
    def token(self) -> str | None:
        auth = self.headers.get("Authorization", "")
        return auth[7:].strip() if auth.lower().startswith("bearer ") else None

    def require_write(self):
        """Writes need the emulator's token: the Hub answers 403 to the same user's read-only
        token and 401 to any other."""
        if self.token() == self.hub.read_token:
            raise HubError(403, "You don't have the rights to write with a read-only token")
        if self.token() != self.hub.token:
            raise HubError(401, INVALID_CREDENTIALS)

    def can_read_private(self) -> bool:
        return self.token() in (self.hub.token, self.hub.read_token)

    def repo_state(self, repo_type: str, repo_id: str) -> dict:
        """Load a repo the caller may read: a private repo without a valid token looks missing (401)."""
        state = self.hub.load(repo_type, repo_id)
        if state is None:
            raise HubError(404, "Repository not found", "RepoNotFound")
        if state["private"] and not self.can_read_private():
            raise HubError(401, "Repository not found", "RepoNotFound")
        return state

    # -- routing -------------------------------------------------------------------------------
    def route(self, method: str, seg: list[str]):
        if seg[:1] == ["api"]:
            return self.route_api(method, seg[1:])
        if seg[:1] == ["lfs-objects"] and len(seg) == 3:
            return self.route_lfs_object(method, seg[1], seg[2])
        repo_type = "model"
        if seg and seg[0] in ("datasets", "spaces"):
            repo_type, seg = REPO_TYPES[seg[0]], seg[1:]
        if len(seg) >= 2 and seg[1].endswith(".git") and seg[2:] == ["info", "lfs", "objects", "batch"]:
            return method == "POST" and self.route_lfs_batch(repo_type, f"{seg[0]}/{seg[1][:-4]}")
        if len(seg) >= 5 and seg[2] == "resolve" and method in ("GET", "HEAD"):
            return self.route_resolve(repo_type, f"{seg[0]}/{seg[1]}", seg[3], "/".join(seg[4:]))
        return False

    def route_api(self, method: str, seg: list[str]):
        if seg == ["whoami-v2"] and method == "GET":
            return self.route_whoami()
        if seg == ["repos", "create"] and method == "POST":
            return self.route_create()
        if seg == ["repos", "delete"] and method == "DELETE":
            return self.route_delete()
        if seg == ["validate-yaml"] and method == "POST":
            return self.route_validate_yaml()
        if len(seg) < 3 or seg[0] not in REPO_TYPES:
            return False
        repo_type, repo_id, rest = REPO_TYPES[seg[0]], f"{seg[1]}/{seg[2]}", seg[3:]
        head = rest[0] if rest else None
        if method in ("GET", "HEAD") and (not rest or (head == "revision" and len(rest) == 2)):
            return self.route_info(repo_type, repo_id, rest[1] if rest else None)
        if head == "tree" and len(rest) >= 2 and method == "GET":
            return self.route_tree(repo_type, repo_id, rest[1], "/".join(rest[2:]))
        if head == "paths-info" and len(rest) == 2 and method == "POST":
            return self.route_paths_info(repo_type, repo_id, rest[1])
        if head == "commits" and len(rest) == 2 and method == "GET":
            return self.route_commits(repo_type, repo_id, rest[1])
        if rest == ["refs"] and method == "GET":
            return self.route_refs(repo_type, repo_id)
        if head == "preupload" and len(rest) == 2 and method == "POST":
            return self.route_preupload(repo_type, repo_id, rest[1])
        if head == "commit" and len(rest) == 2 and method == "POST":
            return self.route_commit(repo_type, repo_id, rest[1])
        if head in ("branch", "tag") and len(rest) == 2 and method in ("POST", "DELETE"):
            return self.route_ref_change(method, head, repo_type, repo_id, rest[1])
        if rest == ["settings"] and method == "PUT":
            return self.route_settings(repo_type, repo_id)
        return False

    # -- account and repos -------------------------------------------------------------------
    def route_whoami(self):
        if not self.can_read_private():
            raise HubError(401, INVALID_CREDENTIALS)
        role = "write" if self.token() == self.hub.token else "read"
        self.send_json(200, {
            "type": "user", "id": "0" * 24, "name": self.hub.user, "fullname": "Test User",
            "email": f"{self.hub.user}@example.com", "emailVerified": True, "canPay": False,
            "isPro": False, "periodEnd": None, "orgs": [],
            "auth": {"type": "access_token",
                     "accessToken": {"displayName": "test", "role": role, "createdAt": now_iso()}},
        })

    def route_create(self):
        self.require_write()
        body = self.json_body()
        repo_type = body.get("type") or "model"
        if repo_type not in URL_PREFIX or not body.get("name"):
            raise HubError(400, "Invalid repo type or name")
        repo_id = f"{body.get('organization') or self.hub.user}/{body['name']}"
        private = bool(body.get("private")) or body.get("visibility") == "private"
        url = f"{self.hub.endpoint}/{URL_PREFIX[repo_type]}{repo_id}"
        try:
            self.hub.create_repo(repo_type, repo_id, private)
        except HubError as err:  # 409: the client reads `url` from the body when exist_ok=True
            self.send_json(err.status, {"error": f"{err.message}: {repo_id}", "url": url},
                           {"X-Error-Message": err.message})
            return
        self.send_json(200, {"url": url, "name": repo_id, "id": hashlib.sha1(repo_id.encode()).hexdigest()[:24]})

    def route_delete(self):
        self.require_write()
        body = self.json_body()
        repo_id = f"{body.get('organization') or self.hub.user}/{body.get('name')}"
        self.hub.delete_repo(body.get("type") or "model", repo_id)
        self.send_json(200, {})

    def route_settings(self, repo_type, repo_id):
        self.require_write()
        body = self.json_body()
        with self.hub._lock:
            state = self.repo_state(repo_type, repo_id)
            if "private" in body or "visibility" in body:
                state["private"] = bool(body.get("private")) or body.get("visibility") == "private"
            self.hub._save(repo_type, repo_id, state)
        self.send_json(200, {"private": state["private"]})

    def route_validate_yaml(self):
        body = self.json_body()
        try:
            parse_front_matter(body.get("content") or "")
        except ValueError as err:
            self.send_json(400, {"errors": [{"message": str(err)}], "warnings": []})
            return
        self.send_json(200, {"errors": [], "warnings": []})

    def read_file(self, state: dict, cid: str, path: str) -> bytes | None:
        entry = state["commits"][cid]["files"].get(path)
        return self.hub.blob_path(entry).read_bytes() if entry else None

    def route_info(self, repo_type, repo_id, rev):
        state = self.repo_state(repo_type, repo_id)
        cid = self.hub.resolve_rev(state, rev or "main")
        commit = state["commits"][cid]
        card = None
        readme = self.read_file(state, cid, "README.md")
        if readme is not None:
            try:
                card = parse_front_matter(readme.decode("utf-8", "replace"))
            except ValueError:
                card = None
        blobs = self.query.get("blobs", ["false"])[0].lower() in ("1", "true")
        siblings = []
        for path, entry in sorted(commit["files"].items()):
            sibling = {"rfilename": path}
            if blobs:
                sibling.update(size=entry["size"], blobId=entry["oid"])
                if "lfs" in entry:
                    sibling["lfs"] = {"sha256": entry["lfs"], "size": entry["size"],
                                      "pointerSize": len(lfs_pointer(entry["lfs"], entry["size"]))}
            siblings.append(sibling)
        tags = list((card or {}).get("tags") or []) if isinstance((card or {}).get("tags"), list) else []
        info = {
            "_id": hashlib.sha1(repo_id.encode()).hexdigest()[:24], "id": repo_id,
            "author": repo_id.split("/")[0], "sha": cid, "lastModified": commit["date"],
            "createdAt": state["createdAt"], "private": state["private"], "gated": False,
            "disabled": False, "downloads": 0, "likes": 0, "tags": tags, "siblings": siblings,
            "cardData": card, "usedStorage": sum(e["size"] for e in commit["files"].values()),
        }
        if repo_type == "model":
            info["modelId"] = repo_id
            info["library_name"] = (card or {}).get("library_name")
            info["pipeline_tag"] = (card or {}).get("pipeline_tag")
            if card and card.get("model-index"):
                info["model-index"] = card["model-index"]
            config = self.read_file(state, cid, "config.json")
            if config is not None:
                try:
                    full = json.loads(config)
                    info["config"] = {k: full[k] for k in ("architectures", "model_type") if k in full}
                except ValueError:
                    pass
            info["spaces"] = []
        elif repo_type == "space":
            info["sdk"] = (card or {}).get("sdk")
        self.send_json(200, info)

    # -- listings ------------------------------------------------------------------------------
    def _expanded(self, key="expand") -> bool:
        return any(v.lower() in ("1", "true") for v in self.query.get(key, []))

    def _entries(self, state, cid, paths, expand) -> list[dict]:
        files = state["commits"][cid]["files"]
        out = []
        for path in paths:
            out.append(self.hub.tree_entry(path, files[path]) if path in files
                       else self.hub.folder_entry(path, files))
        if expand:
            last = self.hub.last_commits(state, cid, paths)
            for item in out:
                item["lastCommit"] = last.get(item["path"])
        return out

    def route_tree(self, repo_type, repo_id, rev, path):
        state = self.repo_state(repo_type, repo_id)
        cid = self.hub.resolve_rev(state, rev)
        files = state["commits"][cid]["files"]
        folders = self.hub.folders(files)
        path = path.strip("/")
        if path and path not in folders:
            raise HubError(404, f"Entry not found: {path}", "EntryNotFound", {"X-Repo-Commit": cid})
        recursive = self.query.get("recursive", ["false"])[0].lower() in ("1", "true")
        prefix = path + "/" if path else ""
        names = [p for p in sorted(set(files) | folders) if p.startswith(prefix)
                 and (recursive or "/" not in p[len(prefix):])]
        # folders first, like the Hub
        names.sort(key=lambda p: (p not in folders, p))
        self.send_json(200, self._entries(state, cid, names, self._expanded()))

    def route_paths_info(self, repo_type, repo_id, rev):
        state = self.repo_state(repo_type, repo_id)
        cid = self.hub.resolve_rev(state, rev)
        if "json" in self.headers.get("Content-Type", ""):
            form = self.json_body()
            paths, expand = form.get("paths") or [], bool(form.get("expand"))
        else:
            form = parse_qs(self.body().decode(), keep_blank_values=True)
            paths = form.get("paths", []) + form.get("paths[]", [])
            expand = form.get("expand", ["false"])[0].lower() in ("1", "true")
        files = state["commits"][cid]["files"]
        folders = self.hub.folders(files)
        wanted = [p.strip("/") for p in paths if p.strip("/") in files or p.strip("/") in folders]
        self.send_json(200, self._entries(state, cid, list(dict.fromkeys(wanted)), expand))

    def route_commits(self, repo_type, repo_id, rev):
        state = self.repo_state(repo_type, repo_id)
        cid = self.hub.resolve_rev(state, rev)
        out = []
        for c in self.hub.history(state, cid):
            commit = state["commits"][c]
            out.append({"id": c, "title": commit["title"], "message": commit["message"],
                        "date": commit["date"], "authors": [{"user": commit["author"], "avatar": None}]})
        self.send_json(200, out)

    def route_refs(self, repo_type, repo_id):
        state = self.repo_state(repo_type, repo_id)

        def refs(kind, items):
            return [{"name": n, "ref": f"refs/{kind}/{n}", "targetCommit": c} for n, c in sorted(items.items())]

        branches = {n: c for n, c in state["branches"].items() if not n.startswith("refs/pr/")}
        prs = [{"name": n, "ref": n, "targetCommit": c}
               for n, c in sorted(state["branches"].items()) if n.startswith("refs/pr/")]
        self.send_json(200, {"branches": refs("heads", branches), "tags": refs("tags", state["tags"]),
                             "converts": [], "pullRequests": prs})

    def route_ref_change(self, method, kind, repo_type, repo_id, name):
        """Create/delete a branch (`POST/DELETE .../branch/{name}`) or tag (`.../tag/{rev}`)."""
        self.require_write()
        body = self.json_body() if method == "POST" else {}
        with self.hub._lock:
            state = self.repo_state(repo_type, repo_id)
            if kind == "branch":
                refs = state["branches"]
                if method == "POST":
                    if name in refs:
                        raise HubError(409, f"Branch {name} already exists")
                    refs[name] = self.hub.resolve_rev(state, body.get("startingPoint") or "main")
                elif name not in refs or name == "main":
                    raise HubError(404 if name != "main" else 403, f"Cannot delete branch {name}",
                                   "RevisionNotFound" if name != "main" else None)
                else:
                    del refs[name]
            else:
                refs = state["tags"]
                if method == "POST":
                    tag = body.get("tag")
                    if not tag:
                        raise HubError(400, "Missing tag name")
                    if tag in refs:
                        raise HubError(409, f"Tag {tag} already exists")
                    refs[tag] = self.hub.resolve_rev(state, name)
                elif name not in refs:
                    raise HubError(404, f"Tag {name} not found", "RevisionNotFound")
                else:
                    del refs[name]
            self.hub._save(repo_type, repo_id, state)
        self.send_json(200, {})

    # -- uploads -------------------------------------------------------------------------------
    def route_preupload(self, repo_type, repo_id, rev):
        self.require_write()
        state = self.repo_state(repo_type, repo_id)
        try:
            files = state["commits"][self.hub.resolve_rev(state, rev)]["files"]
        except HubError:
            files = {}  # a branch that the commit will create
        out = []
        for item in self.json_body().get("files", []):
            sample = base64.b64decode(item.get("sample") or "")
            path, size = item["path"], int(item.get("size") or 0)
            mode = "lfs" if wants_lfs(path, size, sample) else "regular"
            remote = files.get(path)
            oid = (remote.get("lfs") if mode == "lfs" else remote["oid"]) if remote else None
            out.append({"path": path, "uploadMode": mode, "shouldIgnore": False, "oid": oid})
        self.send_json(200, {"files": out, "commitOid": None})

    def route_commit(self, repo_type, repo_id, rev):
        self.require_write()
        self.repo_state(repo_type, repo_id)
        raw = self.body()
        try:  # NDJSON: one {"key": ..., "value": ...} object per line, the header first
            lines = [json.loads(line) for line in raw.splitlines() if line.strip()]
        except ValueError as err:
            raise HubError(400, f"Invalid commit payload: {err}")
        create_pr = self.query.get("create_pr", ["0"])[0] in ("1", "true", "True")
        result = self.hub.commit(repo_type, repo_id, rev, lines, create_pr, self.hub.endpoint)
        self.send_json(200, result)

    def route_lfs_batch(self, repo_type, repo_id):
        """git-lfs batch API: tell the client which objects to PUT, and where."""
        body = self.json_body()
        operation = body.get("operation")
        if operation == "upload":
            self.require_write()
        self.repo_state(repo_type, repo_id)
        objects = []
        for obj in body.get("objects", []):
            oid, size = obj.get("oid", ""), obj.get("size")
            entry = {"oid": oid, "size": size}
            if not re.fullmatch(r"[0-9a-f]{64}", oid):
                entry["error"] = {"code": 422, "message": "Invalid sha256 oid"}
            elif operation == "upload":
                if self.hub.lfs_size(oid) != size:  # absent: ask for it; present: no actions
                    href = f"{self.hub.endpoint}/lfs-objects/{oid}/{size}"
                    entry["actions"] = {"upload": {"href": href}, "verify": {"href": href}}
            elif self.hub.lfs_size(oid) is not None:
                entry["actions"] = {"download": {"href": f"{self.hub.endpoint}/lfs-objects/{oid}/{size}"}}
            else:
                entry["error"] = {"code": 404, "message": "Object does not exist"}
            objects.append(entry)
        self.send_json(200, {"transfer": "basic", "objects": objects, "hash_algo": "sha256"})

    def route_lfs_object(self, method, oid, size):
        """PUT uploads an object (checked against its sha256), POST verifies, GET downloads."""
        if not re.fullmatch(r"[0-9a-f]{64}", oid) or not size.isdigit():
            raise HubError(400, "Invalid LFS object address")
        if method == "PUT":
            tmp = self.hub.root / "tmp" / uuid.uuid4().hex
            digest, total = hashlib.sha256(), 0
            with open(tmp, "wb") as f:
                for chunk in self._iter_body():
                    digest.update(chunk)
                    total += len(chunk)
                    f.write(chunk)
            self._body = b""
            if self.hub.fail_next_lfs_upload:  # test hook: the storage backend rejects this upload
                self.hub.fail_next_lfs_upload = False
                tmp.unlink()
                raise HubError(403, "Simulated LFS storage failure")
            if digest.hexdigest() != oid or total != int(size):
                tmp.unlink()
                raise HubError(400, "Uploaded content does not match its oid/size")
            final = self.hub._object_path("lfs", oid)
            final.parent.mkdir(parents=True, exist_ok=True)
            os.replace(tmp, final)
            self.status = 200
            self.send_response(200)
            self.send_header("ETag", f'"{oid}"')
            self.send_header("Content-Length", "0")
            self.end_headers()
            return True
        if method == "POST":
            body = self.json_body()
            if self.hub.lfs_size(body.get("oid", oid)) != int(body.get("size", size)):
                raise HubError(404, "Object not found or size mismatch")
            self.send_json(200, {"success": True})
            return True
        if method in ("GET", "HEAD") and self.hub.lfs_size(oid) is not None:
            return self.send_file(self.hub._object_path("lfs", oid), {})
        return False

    # -- downloads -----------------------------------------------------------------------------
    def route_resolve(self, repo_type, repo_id, rev, path):
        state = self.repo_state(repo_type, repo_id)
        cid = self.hub.resolve_rev(state, rev)
        entry = state["commits"][cid]["files"].get(path)
        if entry is None:
            raise HubError(404, f"Entry not found: {path}", "EntryNotFound", {"X-Repo-Commit": cid})
        headers = {"X-Repo-Commit": cid, "ETag": f'"{entry.get("lfs") or entry["oid"]}"'}
        if "lfs" in entry:
            headers["X-Linked-Etag"] = f'"{entry["lfs"]}"'
            headers["X-Linked-Size"] = str(entry["size"])
        return self.send_file(self.hub.blob_path(entry), headers)

    def send_file(self, file: Path, headers: dict):
        """Send a file or, with a `Range: bytes=a-b` header, the part asked for (206)."""
        total = file.stat().st_size
        start, end, status = 0, total - 1, 200
        wanted = self.headers.get("Range")
        if wanted:
            match = re.fullmatch(r"\s*bytes=(\d*)-(\d*)\s*", wanted)
            if match is None or match.groups() == ("", ""):
                raise HubError(416, "Unsupported range", headers={"Content-Range": f"bytes */{total}"})
            first, last = match.groups()
            if first == "":  # suffix: the last N bytes
                start, end = max(total - int(last), 0), total - 1
            else:
                start, end = int(first), min(int(last), total - 1) if last else total - 1
            if (start >= total or start > end) and not (total == 0 and start == 0):
                raise HubError(416, "Requested range not satisfiable", headers={"Content-Range": f"bytes */{total}"})
            status = 206
        length = max(end - start + 1, 0)
        self.status = status
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(length))
        self.send_header("Accept-Ranges", "bytes")
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{end}/{total}")
        for key, value in headers.items():
            self.send_header(key, value)
        self.end_headers()
        if self.method == "HEAD":
            return True
        with open(file, "rb") as f:
            f.seek(start)
            left = length
            while left > 0:
                data = f.read(min(left, CHUNK))
                if not data:
                    break
                self.wfile.write(data)
                left -= len(data)
        return True
