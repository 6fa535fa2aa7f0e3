"""A small local Hugging Face Hub for tests: the HTTP protocol huggingface_hub 1.3x and 2.x speak, files on disk.

Written from huggingface_hub's client code (`hf_api.py`, `_commit_api.py`, `lfs.py`,
`file_download.py`, `utils/_http.py`), not from our own: create repo, validate-yaml, preupload,
LFS batch + PUT + verify, NDJSON commit, branches, revision info and tree listings, and
`resolve` HEAD/GET with the X-Repo-Commit / ETag / X-Linked-Etag / X-Linked-Size headers.
Model and dataset repos (`/api/datasets/...`, `/datasets/NAME/resolve/...`, stored as datasets/NAME), and
`paths-info`, as far as `datasets.load_dataset` (5.x, through HfFileSystem) reads a dataset repo.
Errors carry the Hub's X-Error-Code (RepoNotFound, RevisionNotFound, EntryNotFound).

Like the real Hub it has two origins: the API (`endpoint`) and a storage host standing in for the
LFS bucket and CDN (uploads go there to pre-signed URLs, LFS downloads are redirected there), so
huggingface_hub's redirect and auth-stripping logic runs as in production. Xet is not spoken:
clients must run with HF_HUB_DISABLE_XET=1.

Fault switches (`server.faults`): `commit_500`, `drop_upload` and `drop_commit` count down the
next commits answered with HTTP 500, and the next LFS uploads and commits whose connection is
dropped half-way through the request body; `lose_commit_answer` the next commits that are made
but never answered; `refuse_token` makes every request carrying a token fail with 401.
"""
from __future__ import annotations

import base64
import fnmatch
import hashlib
import json
import os
import socket
import tempfile
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

import yaml

# What a new repo on the Hub starts with (abridged): the patterns that route files to LFS.
GITATTRIBUTES = "".join(f"{p} filter=lfs diff=lfs merge=lfs -text\n" for p in (
    "*.bin", "*.ckpt", "*.h5", "*.npz", "*.onnx", "*.pt", "*.pth", "*.pkl", "*.safetensors", "*.zip"))
LFS_THRESHOLD = 10 * 1024 * 1024  # the Hub stores bigger files in LFS whatever their name


def git_blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lfs_pointer(sha256: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


@dataclass
class Faults:
    commit_500: int = 0         # answer the next N commits with 500 (nothing is committed)
    drop_upload: int = 0        # drop the connection half-way through the next N LFS uploads (PUT)
    drop_commit: int = 0        # drop the connection half-way through the next N commits (nothing is committed)
    lose_commit_answer: int = 0  # make the next N commits, then drop the connection instead of answering
    refuse_token: bool = False  # 401 for every request that carries a token

    def take(self, name: str) -> bool:
        """Consume one count of a counting fault; True if it fires."""
        n = getattr(self, name)
        setattr(self, name, max(0, n - 1))
        return n > 0


class HubError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None, commit: str | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.commit = status, message, code, commit


@dataclass
class Store:
    """Repos, commits and blobs under one folder; one lock serialises every change."""

    root: Path
    lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        for sub in ("repos", "blobs", "lfs"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)

    # --- files ---
    def write(self, path: Path, data: bytes) -> None:
        fd, tmp = tempfile.mkstemp(dir=path.parent)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)

    def put_blob(self, data: bytes) -> str:
        oid = git_blob_id(data)
        self.write(self.root / "blobs" / oid, data)
        return oid

    def blob(self, oid: str) -> bytes:
        return (self.root / "blobs" / oid).read_bytes()

    def lfs_path(self, sha256: str) -> Path:
        return self.root / "lfs" / sha256

    # --- repos ---
    def _repo_file(self, repo_id: str) -> Path:
        return self.root / "repos" / (repo_id.replace("/", "__") + ".json")

    def repo(self, repo_id: str) -> dict:
        path = self._repo_file(repo_id)
        if not path.is_file():
            raise HubError(404, "Repository not found", "RepoNotFound")
        return json.loads(path.read_text())

    def save_repo(self, repo_id: str, repo: dict) -> None:
        self.write(self._repo_file(repo_id), json.dumps(repo, indent=1).encode())

    def exists(self, repo_id: str) -> bool:
        return self._repo_file(repo_id).is_file()

    @staticmethod
    def resolve(repo: dict, revision: str) -> str:
        if revision in repo["refs"]:
            return repo["refs"][revision]
        if len(revision) == 40 and revision in repo["commits"]:
            return revision
        raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")

    @staticmethod
    def new_commit(repo: dict, parent: str | None, title: str, files: dict) -> str:
        body = json.dumps({"parent": parent, "title": title, "files": files}, sort_keys=True)
        oid = hashlib.sha1(f"{len(repo['commits'])}\n{body}".encode()).hexdigest()
        repo["commits"][oid] = {"parent": parent, "title": title, "files": files}
        return oid


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    hub: "HubServer"


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as the Hub; every answer sets Content-Length
    server: _Server

    def log_message(self, *args) -> None:  # the request log below is enough
        pass

    # --- plumbing ---
    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            out = bytearray()
            while True:
                size = int(self.rfile.readline().split(b";")[0], 16)
                if size == 0:
                    self.rfile.readline()
                    return bytes(out)
                out += self.rfile.read(size)
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _send(self, status: int, body: bytes = b"", headers: dict | None = None,
              content_type: str = "application/json") -> None:
        self.send_response(status)
        for k, v in {"Content-Type": content_type, **(headers or {})}.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))  # for HEAD too: the size GET would send
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)
        self.server.hub.log.append((self.command, self.path, status))

    def _hang_up(self, read_half: bool = True) -> None:
        """Close the connection without answering (after reading half the request body)."""
        if read_half:
            self.rfile.read(int(self.headers.get("Content-Length") or 0) // 2)
        self.server.hub.log.append((self.command, self.path, 0))
        self.close_connection = True
        self.connection.shutdown(socket.SHUT_RDWR)

    def _json(self, status: int, obj, headers: dict | None = None, content_type: str = "application/json") -> None:
        self._send(status, json.dumps(obj).encode(), headers, content_type)

    def _error(self, e: HubError) -> None:
        headers = {"X-Error-Message": e.message}
        if e.code:
            headers["X-Error-Code"] = e.code
        if e.commit:
            headers["X-Repo-Commit"] = e.commit
        self._json(e.status, {"error": e.message}, headers)

    def _user(self, required: bool) -> str | None:
        """The token's user; 401 for a refused token, or for none where one is required."""
        auth = self.headers.get("Authorization", "")
        token = auth[len("Bearer "):] if auth.startswith("Bearer ") else None
        hub = self.server.hub
        if token is not None and (hub.faults.refuse_token or token not in hub.tokens):
            raise HubError(401, "Invalid credentials in Authorization header")
        if token is None and required:
            raise HubError(401, "You must be authenticated to access this resource")
        return hub.tokens.get(token) if token else None

    def _dispatch(self) -> None:
        url = urlsplit(self.path)
        parts = [unquote(p) for p in url.path.split("/")[1:]]
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        try:
            self.server.hub.route(self, self.command, parts, query)
        except HubError as e:
            self._error(e)
        except (ValueError, KeyError, TypeError, IndexError) as e:  # malformed request (bad JSON, missing field)
            self._error(HubError(400, f"malformed request: {type(e).__name__}: {e}"))
        except (ConnectionError, socket.timeout):
            self.close_connection = True

    do_GET = do_HEAD = do_POST = do_PUT = _dispatch


class HubServer:
    """Start with `HubServer(root, user, token).start()`; `endpoint` is the value for HF_ENDPOINT.

    `token` is the one token the server accepts; it belongs to `user`, who may write to the
    namespace of that name only.
    """

    def __init__(self, root: Path, user: str, token: str):
        self.store = Store(Path(root))
        self.user, self.token = user, token
        self.tokens = {token: user}  # token -> user name (the namespace it may write to)
        self.faults = Faults()
        self.log: list[tuple[str, str, int]] = []
        self._api = _Server(("127.0.0.1", 0), _Handler)
        self._storage = _Server(("127.0.0.1", 0), _Handler)
        self._api.hub = self._storage.hub = self
        self.endpoint = f"http://127.0.0.1:{self._api.server_address[1]}"
        # Another host name for the same loopback address: huggingface_hub 1.x tells the Hub from its CDN by
        # host name alone (2.x by origin), and follows redirects that stay on the Hub's host.
        self.storage_url = f"http://localhost:{self._storage.server_address[1]}"

    def start(self) -> "HubServer":
        for s in (self._api, self._storage):
            threading.Thread(target=s.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        return self

    def stop(self) -> None:
        for s in (self._api, self._storage):
            s.shutdown()
            s.server_close()

    # --- inspection for tests ---
    def commits(self, repo_id: str, revision: str = "main") -> list[str]:
        """Commit ids of a branch, newest first."""
        repo = self.store.repo(repo_id)
        oid, out = repo["refs"][revision], []
        while oid:
            out.append(oid)
            oid = repo["commits"][oid]["parent"]
        return out

    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        repo = self.store.repo(repo_id)
        entries = repo["commits"][Store.resolve(repo, revision)]["files"]
        return {p: self._content(e) for p, e in entries.items()}

    def _content(self, entry: dict) -> bytes:
        if entry.get("lfs"):
            return self.store.lfs_path(entry["lfs"]["oid"]).read_bytes()
        return self.store.blob(entry["oid"])

    # --- routing ---
    def route(self, h: _Handler, method: str, parts: list[str], query: dict) -> None:
        storage = h.server is self._storage
        if storage and parts[:1] == ["upload"] and method == "PUT":
            return self._lfs_put(h, parts[1])
        if storage and parts[:1] == ["objects"] and method in ("GET", "HEAD"):
            return self._lfs_get(h, parts[1])
        if storage:
            raise HubError(404, "Not found")
        user = h._user(required=method not in ("GET", "HEAD"))
        if parts[:2] == ["api", "repos"] and parts[2:] == ["create"] and method == "POST":
            return self._create_repo(h, user, json.loads(h._body()))
        if parts == ["api", "validate-yaml"] and method == "POST":
            return self._validate_yaml(h, json.loads(h._body()))
        # a dataset repo is stored under datasets/NAMESPACE/NAME, a model repo under NAMESPACE/NAME
        if parts[:2] in (["api", "models"], ["api", "datasets"]) and len(parts) >= 4:
            kind = "datasets/" if parts[1] == "datasets" else ""
            repo_id, action, rest = kind + "/".join(parts[2:4]), parts[4] if len(parts) > 4 else None, parts[5:]
            if action is None and method == "GET":
                return self._info(h, repo_id, "main", user)
            if action == "revision" and method == "GET":
                return self._info(h, repo_id, rest[0], user)
            if action == "tree" and method == "GET":
                return self._tree(h, repo_id, rest[0], "/".join(rest[1:]), query, user)
            if action == "paths-info" and method == "POST":
                return self._paths_info(h, repo_id, rest[0], user)
            if action == "preupload" and method == "POST":
                return self._preupload(h, repo_id, rest[0], query, user)
            if action == "commit" and method == "POST":
                return self._commit(h, repo_id, rest[0], query, user)
            if action == "branch" and method == "POST":
                return self._branch(h, repo_id, "/".join(rest), user)
        kind = "datasets/" if parts[:1] == ["datasets"] else ""
        parts = parts[1:] if kind else parts
        if len(parts) == 6 and parts[1].endswith(".git") and parts[2:5] == ["info", "lfs", "objects"]:
            repo_id = f"{kind}{parts[0]}/{parts[1][:-4]}"
            if parts[5] == "batch" and method == "POST":
                return self._lfs_batch(h, repo_id, json.loads(h._body()), user)
            if parts[5] == "verify" and method == "POST":
                return self._lfs_verify(h, json.loads(h._body()))
        if len(parts) >= 5 and parts[2] == "resolve" and method in ("GET", "HEAD"):
            return self._resolve(h, f"{kind}{parts[0]}/{parts[1]}", parts[3], "/".join(parts[4:]), user)
        raise HubError(404, f"no route for {method} {h.path}")

    # --- repos ---
    def _readable(self, repo_id: str, user: str | None) -> dict:
        repo = self.store.repo(repo_id)
        if repo["private"] and user != repo_id.split("/")[-2]:
            raise HubError(404, "Repository not found", "RepoNotFound")  # the Hub hides private repos
        return repo

    def _writable(self, repo_id: str, user: str | None) -> dict:
        repo = self._readable(repo_id, user)
        if user != repo_id.split("/")[-2]:
            raise HubError(403, f"You don't have the rights to write to {repo_id}")
        return repo

    def _create_repo(self, h: _Handler, user: str, body: dict) -> None:
        namespace = body.get("organization") or user
        kind = "datasets/" if body.get("type") == "dataset" else ""
        repo_id = f"{kind}{namespace}/{body['name']}"
        if namespace != user:
            raise HubError(403, f"You don't have the rights to create a model under the namespace {namespace}")
        with self.store.lock:
            if self.store.exists(repo_id):
                return h._json(409, {"error": "You already created this model repo", "url": self._url(repo_id)})
            private = body.get("visibility", "public") == "private" or bool(body.get("private"))
            repo = {"private": private, "refs": {}, "commits": {}, "prs": 0}
            files = {".gitattributes": self._entry(GITATTRIBUTES.encode(), lfs=False)}
            repo["refs"]["main"] = Store.new_commit(repo, None, "initial commit", files)
            self.store.save_repo(repo_id, repo)
        name = repo_id.removeprefix("datasets/")
        h._json(200, {"url": self._url(repo_id), "name": name, "id": name})

    def _url(self, repo_id: str) -> str:
        return f"{self.endpoint}/{repo_id}"

    def _entry(self, data: bytes, lfs: bool) -> dict:
        if not lfs:
            return {"oid": self.store.put_blob(data), "size": len(data), "lfs": None}
        sha = hashlib.sha256(data).hexdigest()
        return self._lfs_entry(sha, len(data))

    def _lfs_entry(self, sha256: str, size: int) -> dict:
        pointer = lfs_pointer(sha256, size)
        return {"oid": self.store.put_blob(pointer), "size": size,
                "lfs": {"oid": sha256, "size": size, "pointerSize": len(pointer)}}

    def _info(self, h: _Handler, repo_id: str, revision: str, user: str | None) -> None:
        repo = self._readable(repo_id, user)
        sha = Store.resolve(repo, revision)
        files = sorted(repo["commits"][sha]["files"])
        h._json(200, {"id": repo_id.removeprefix("datasets/"), "author": repo_id.split("/")[-2], "sha": sha,
                      "private": repo["private"], "lastModified": "2026-01-01T00:00:00.000Z",
                      "siblings": [{"rfilename": p} for p in files], "tags": [], "library_name": None})

    def _tree(self, h: _Handler, repo_id: str, revision: str, path: str, query: dict, user: str | None) -> None:
        repo = self._readable(repo_id, user)
        files = repo["commits"][Store.resolve(repo, revision)]["files"]
        prefix = f"{path}/" if path else ""
        recursive = query.get("recursive", "False").lower() == "true"
        out, folders = [], set()
        for p in sorted(files):
            if not p.startswith(prefix):
                continue
            rest = p[len(prefix):]
            if "/" in rest and not recursive:
                folders.add(prefix + rest.split("/")[0])
                continue
            e = files[p]
            item = {"type": "file", "path": p, "oid": e["oid"], "size": e["size"]}
            if e["lfs"]:
                item["lfs"] = e["lfs"]
            out.append(item)
        out += [{"type": "directory", "path": f, "oid": hashlib.sha1(f.encode()).hexdigest()} for f in sorted(folders)]
        if path and not out:
            raise HubError(404, f"{path} does not exist", "EntryNotFound")
        h._json(200, out)

    def _paths_info(self, h: _Handler, repo_id: str, revision: str, user: str | None) -> None:
        """The entries of the form's `paths` (files, or folders holding files); unknown paths are left out."""
        repo = self._readable(repo_id, user)
        files = repo["commits"][Store.resolve(repo, revision)]["files"]
        out = []
        for p in parse_qs(h._body().decode()).get("paths", []):
            p = p.strip("/")
            if p in files:
                e = files[p]
                out.append({"type": "file", "path": p, "oid": e["oid"], "size": e["size"],
                            **({"lfs": e["lfs"]} if e["lfs"] else {})})
            elif any(f.startswith(p + "/") for f in files):
                out.append({"type": "directory", "path": p, "oid": hashlib.sha1(p.encode()).hexdigest()})
        h._json(200, out)

    def _branch(self, h: _Handler, repo_id: str, branch: str, user: str) -> None:
        body = json.loads(h._body() or b"{}")
        with self.store.lock:
            repo = self._writable(repo_id, user)
            if branch in repo["refs"]:
                raise HubError(409, f"Reference already exists: refs/heads/{branch}")
            repo["refs"][branch] = Store.resolve(repo, body.get("startingPoint") or "main")
            self.store.save_repo(repo_id, repo)
        h._json(200, {})

    # --- metadata ---
    def _validate_yaml(self, h: _Handler, body: dict) -> None:
        content = body.get("content", "")
        if not content.startswith("---"):
            return h._json(200, {"warnings": []})
        try:
            meta = yaml.safe_load(content.split("---", 2)[1])
            _check_model_metadata(meta)
        except (yaml.YAMLError, ValueError, IndexError, KeyError, TypeError, AttributeError) as e:
            raise HubError(400, f"Invalid metadata in README.md. {e}")
        h._json(200, {"warnings": []})

    # --- upload ---
    def _lfs_mode(self, files: dict, path: str, size: int, sample: bytes) -> bool:
        attrs = files.get(".gitattributes")
        patterns = [line.split()[0] for line in self.store.blob(attrs["oid"]).decode().splitlines()
                    if "filter=lfs" in line] if attrs else []
        name = path.rsplit("/", 1)[-1]
        return size > LFS_THRESHOLD or b"\0" in sample or any(fnmatch.fnmatch(name, p) for p in patterns)

    def _preupload(self, h: _Handler, repo_id: str, revision: str, query: dict, user: str) -> None:
        body = json.loads(h._body())
        repo = self._writable(repo_id, user)
        files = repo["commits"][Store.resolve(repo, revision)]["files"]
        out = []
        for f in body["files"]:
            lfs = self._lfs_mode(files, f["path"], f["size"], base64.b64decode(f["sample"]))
            old = files.get(f["path"])
            oid = (old["lfs"]["oid"] if old["lfs"] else old["oid"]) if old else None
            out.append({"path": f["path"], "uploadMode": "lfs" if lfs else "regular",
                        "shouldIgnore": False, "oid": oid})
        h._json(200, {"files": out, "commitOid": Store.resolve(repo, revision)})

    def _lfs_batch(self, h: _Handler, repo_id: str, body: dict, user: str) -> None:
        self._writable(repo_id, user)
        objects = []
        for o in body["objects"]:
            item = {"oid": o["oid"], "size": o["size"], "authenticated": True}
            if not self.store.lfs_path(o["oid"]).is_file():
                sig = hashlib.sha256(os.urandom(16)).hexdigest()[:16]  # a pre-signed URL, as S3's
                item["actions"] = {
                    "upload": {"href": f"{self.storage_url}/upload/{o['oid']}?size={o['size']}&sig={sig}"},
                    "verify": {"href": f"{self.endpoint}/{repo_id}.git/info/lfs/objects/verify"},
                }
            objects.append(item)
        h._json(200, {"transfer": "basic", "objects": objects}, content_type="application/vnd.git-lfs+json")

    def _lfs_put(self, h: _Handler, sha256: str) -> None:
        with self.store.lock:
            drop = self.faults.take("drop_upload")
        if drop:
            return h._hang_up()
        data = h._body()
        if hashlib.sha256(data).hexdigest() != sha256:
            raise HubError(400, "uploaded content does not match its sha256")
        self.store.write(self.store.lfs_path(sha256), data)
        h._send(200, headers={"ETag": f'"{hashlib.md5(data).hexdigest()}"'})

    def _lfs_verify(self, h: _Handler, body: dict) -> None:
        path = self.store.lfs_path(body["oid"])
        if not path.is_file() or path.stat().st_size != body["size"]:
            raise HubError(404, f"object {body['oid']} not found")
        h._json(200, {})

    def _lfs_get(self, h: _Handler, sha256: str) -> None:
        path = self.store.lfs_path(sha256)
        if not path.is_file():
            raise HubError(404, "Not found")
        data = path.read_bytes()
        start = 0
        if h.headers.get("Range", "").startswith("bytes="):
            start = int(h.headers["Range"][6:].split("-")[0])
        h._send(206 if start else 200, data[start:], content_type="application/octet-stream",
                headers={"ETag": f'"{sha256}"'})

    def _commit(self, h: _Handler, repo_id: str, revision: str, query: dict, user: str) -> None:
        with self.store.lock:
            drop = self.faults.take("drop_commit")
            fail = not drop and self.faults.take("commit_500")
        if drop:
            return h._hang_up()
        lines = [json.loads(line) for line in h._body().splitlines() if line.strip()]
        if fail:
            raise HubError(500, "Internal Error")
        header = lines[0]["value"]
        with self.store.lock:
            repo = self._writable(repo_id, user)
            head = Store.resolve(repo, revision)
            if header.get("parentCommit") not in (None, head):
                raise HubError(412, "A commit has happened since. Please refresh and try again.")
            files = dict(repo["commits"][head]["files"])
            for op in lines[1:]:
                v = op["value"]
                if op["key"] == "file":
                    files[v["path"]] = self._entry(base64.b64decode(v["content"]), lfs=False)
                elif op["key"] == "lfsFile":
                    stored = self.store.lfs_path(v["oid"])
                    if not stored.is_file() or stored.stat().st_size != v["size"]:
                        raise HubError(422, f"LFS object {v['oid']} of {v['path']} was never uploaded")
                    files[v["path"]] = self._lfs_entry(v["oid"], v["size"])
                elif op["key"] == "deletedFile":
                    files.pop(v["path"], None)
                elif op["key"] == "deletedFolder":
                    files = {p: e for p, e in files.items() if not p.startswith(v["path"].rstrip("/") + "/")}
                else:
                    raise HubError(400, f"unknown commit operation {op['key']}")
            oid = Store.new_commit(repo, head, header["summary"], files)
            pr_url = None
            if query.get("create_pr") == "1":
                repo["prs"] += 1
                repo["refs"][f"refs/pr/{repo['prs']}"] = oid
                pr_url = f"{self._url(repo_id)}/discussions/{repo['prs']}"
            else:
                repo["refs"][revision] = oid
            self.store.save_repo(repo_id, repo)
            lost = self.faults.take("lose_commit_answer")
        if lost:
            return h._hang_up(read_half=False)
        h._json(200, {"success": True, "commitOid": oid, "commitUrl": f"{self._url(repo_id)}/commit/{oid}",
                      "pullRequestUrl": pr_url, "hookOutput": ""})

    # --- download ---
    def _resolve(self, h: _Handler, repo_id: str, revision: str, path: str, user: str | None) -> None:
        repo = self._readable(repo_id, user)
        sha = Store.resolve(repo, revision)
        entry = repo["commits"][sha]["files"].get(path)
        if entry is None:
            raise HubError(404, "Entry not found", "EntryNotFound", commit=sha)
        headers = {"X-Repo-Commit": sha, "ETag": f'"{entry["oid"]}"'}
        if entry["lfs"]:  # LFS content lives on the storage host: redirect there, as the Hub does to its CDN
            lfs = entry["lfs"]
            headers.update({"X-Linked-Etag": f'"{lfs["oid"]}"', "X-Linked-Size": str(lfs["size"]),
                            "Location": f"{self.storage_url}/objects/{lfs['oid']}"})
            return h._send(302, b"", headers)
        h._send(200, self.store.blob(entry["oid"]), headers, content_type="application/octet-stream")


def _check_model_metadata(meta) -> None:
    """The subset of the Hub's model-card metadata rules that our cards exercise."""
    if not isinstance(meta, dict):
        raise ValueError("metadata must be a YAML mapping")
    for key in ("license", "library_name", "pipeline_tag"):
        if key in meta and not isinstance(meta[key], str):
            raise ValueError(f'"{key}" must be a string')
    for key in ("tags", "datasets"):
        if key in meta and not (isinstance(meta[key], list) and all(isinstance(t, str) for t in meta[key])):
            raise ValueError(f'"{key}" must be a list of strings')
    base = meta.get("base_model")
    if base is not None:
        for b in base if isinstance(base, list) else [base]:
            if not (isinstance(b, str) and b.count("/") == 1):
                raise ValueError('"base_model" must be a repo id "namespace/name" or a list of them')
    for model in meta.get("model-index", []):
        if not isinstance(model["name"], str):
            raise ValueError('"model-index[].name" must be a string')
        for r in model["results"]:
            if not (isinstance(r["task"]["type"], str) and isinstance(r["dataset"]["type"], str)
                    and isinstance(r["dataset"]["name"], str)):
                raise ValueError('"model-index[].results[]" needs task.type, dataset.type and dataset.name')
            for m in r["metrics"]:
                if not (isinstance(m["type"], str) and isinstance(m["value"], (int, float))):
                    raise ValueError('"model-index[].results[].metrics[]" needs a type and a numeric value')
