"""A small Hub server on the loopback: the endpoints the real huggingface_hub client calls to create a repo,
preupload, commit (regular, base64 files), create a branch, read repo info and trees, and resolve files."""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlparse

import yaml


class HubState:
    def __init__(self) -> None:
        self.repos: dict[str, dict] = {}  # repo_id → {"private": bool, "branches": {name: {"files", "sha"}}}
        self.fail_uploads = False
        self.fail_status: int | None = None  # answer every write (create, preupload, commit) with this status
        self.drop_connections = False  # close write requests without an answer
        self.lock = threading.Lock()


def _sha(data: bytes) -> str:
    return hashlib.sha1(data).hexdigest()


REPO_ID = re.compile(r"^(?:[\w\-.]+/)?[\w\-.]{1,96}$")


def metadata_errors(meta: dict) -> list[str]:
    """The model card rules the Hub enforces on push that a card generator can break: base_model must be hub
    model ids; every model-index result needs task.type, dataset.type/name and metrics with type and value."""
    errors = []
    bases = meta.get("base_model")
    for base in [bases] if isinstance(bases, str) else bases or []:
        if not isinstance(base, str) or not REPO_ID.match(base) or ".." in base or base.startswith(("/", ".", "~")):
            errors.append(f'"base_model" with value "{base}" is not a valid model id')
    if meta.get("base_model_relation") and not bases:
        errors.append('"base_model_relation" requires "base_model"')
    for i, entry in enumerate(meta.get("model-index") or []):
        if not isinstance(entry, dict) or not entry.get("name"):
            errors.append(f'"model-index[{i}].name" is required')
            continue
        for j, result in enumerate(entry.get("results") or []):
            where = f"model-index[{i}].results[{j}]"
            if not (result.get("task") or {}).get("type"):
                errors.append(f'"{where}.task.type" is required')
            dataset = result.get("dataset") or {}
            for key in ("type", "name"):
                if not isinstance(dataset.get(key), str) or not dataset.get(key):
                    errors.append(f'"{where}.dataset.{key}" must be a string')
            for k, metric in enumerate(result.get("metrics") or [{}]):
                if not metric.get("type") or "value" not in metric:
                    errors.append(f'"{where}.metrics[{k}]" needs a type and a value')
    return errors


class Handler(BaseHTTPRequestHandler):
    state: HubState

    def log_message(self, *args) -> None:  # keep pytest output clean
        pass

    def _send(self, code: int, body: bytes | dict | list = b"", headers: dict | None = None,
              head: bool = False) -> None:
        data = json.dumps(body).encode() if isinstance(body, (dict, list)) else body
        self.send_response(code)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        if isinstance(body, (dict, list)):
            self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if not head:
            self.wfile.write(data)

    def _error(self, code: int, error_code: str, message: str, head: bool = False) -> None:
        self._send(code, {"error": message}, {"X-Error-Code": error_code, "X-Error-Message": message}, head)

    def _body(self) -> bytes:
        return self.rfile.read(int(self.headers.get("Content-Length", 0)))

    def _authorized(self, repo: dict) -> bool:
        return not repo["private"] or self.headers.get("Authorization", "").startswith("Bearer ")

    def do_POST(self) -> None:  # noqa: N802
        path = unquote(urlparse(self.path).path)
        st = self.state
        if path != "/api/validate-yaml" and (st.drop_connections or st.fail_status):
            self._body()
            if st.drop_connections:
                self.close_connection = True
                return
            messages = {401: ("Unauthorized", "Invalid credentials in Authorization header"),
                        403: ("Forbidden", "You don't have the rights to create a model under this namespace"),
                        404: ("RepoNotFound", "Repository not found")}
            code, message = messages.get(st.fail_status, ("InternalError", "Internal Error"))
            return self._error(st.fail_status, code, message)
        if path == "/api/validate-yaml":
            content = json.loads(self._body())["content"]
            match = re.match(r"^---\n(.*?)\n---", content, re.S)
            try:
                meta = yaml.safe_load(match.group(1)) if match else None
            except yaml.YAMLError as err:
                return self._send(400, {"errors": [{"message": str(err)}], "warnings": []})
            warnings = [] if isinstance(meta, dict) and meta else [{"message": "empty or missing yaml metadata"}]
            errors = [{"message": m} for m in metadata_errors(meta if isinstance(meta, dict) else {})]
            return self._send(400 if errors else 200, {"errors": errors, "warnings": warnings})
        if path == "/api/repos/create":
            payload = json.loads(self._body())
            repo_id = f"{payload['organization']}/{payload['name']}" if payload.get("organization") else \
                payload["name"]
            with st.lock:
                if repo_id in st.repos:
                    return self._send(409, {"error": "You already created this model repo", "url": repo_id})
                private = payload.get("private") or payload.get("visibility") == "private"
                st.repos[repo_id] = {"private": bool(private), "branches": {"main": {"files": {}, "sha": "0" * 40}}}
            return self._send(200, {"url": f"http://{self.headers['Host']}/{repo_id}", "name": repo_id})
        m = re.match(r"^/api/models/(.+?/.+?)/(preupload|commit|branch)/(.+)$", path)
        if not m:
            return self._error(404, "RepoNotFound", f"no route {path}")
        repo_id, action, revision = m.groups()
        repo = st.repos.get(repo_id)
        if repo is None:
            self._body()
            return self._error(404, "RepoNotFound", f"Repository {repo_id} not found")
        if action == "preupload":
            if st.fail_uploads:
                self._body()
                return self._error(500, "InternalError", "upload storage unavailable")
            files = json.loads(self._body())["files"]
            return self._send(200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                                              for f in files]})
        if action == "branch":
            self._body()
            with st.lock:
                repo["branches"].setdefault(revision, dict(repo["branches"]["main"]))
            return self._send(200, {})
        body = self._body()
        branch = repo["branches"].get(revision)
        if branch is None:
            return self._error(404, "RevisionNotFound", f"Revision {revision} not found")
        files = dict(branch["files"])
        for line in body.splitlines():
            item = json.loads(line)
            if item["key"] == "file":
                files[item["value"]["path"]] = base64.b64decode(item["value"]["content"])
            elif item["key"] == "deletedFile":
                files.pop(item["value"]["path"], None)
        sha = _sha(b"".join(k.encode() + v for k, v in sorted(files.items())))
        with st.lock:
            repo["branches"][revision] = {"files": files, "sha": sha}
        host = self.headers["Host"]
        return self._send(200, {"commitUrl": f"http://{host}/{repo_id}/commit/{sha}", "commitOid": sha,
                                "pullRequestUrl": None})

    def do_HEAD(self) -> None:  # noqa: N802
        self._get(head=True)

    def do_GET(self) -> None:  # noqa: N802
        self._get(head=False)

    def _get(self, head: bool) -> None:
        path = unquote(urlparse(self.path).path)
        m = re.match(r"^/api/models/(.+?/.+?)(?:/(revision|tree)/([^/]+)(?:/.*)?)?$", path)
        if m:
            repo_id, kind, revision = m.groups()
            repo = self.state.repos.get(repo_id)
            if repo is None or not self._authorized(repo):
                return self._error(404, "RepoNotFound", f"Repository {repo_id} not found", head)
            branch = repo["branches"].get(revision or "main")
            if branch is None:
                return self._error(404, "RevisionNotFound", f"Revision {revision} not found", head)
            if kind == "tree":
                return self._send(200, [{"type": "file", "path": p, "size": len(d), "oid": _sha(d)}
                                        for p, d in sorted(branch["files"].items())], head=head)
            return self._send(200, {"id": repo_id, "modelId": repo_id, "sha": branch["sha"],
                                    "private": repo["private"],
                                    "siblings": [{"rfilename": p} for p in sorted(branch["files"])]}, head=head)
        m = re.match(r"^/(.+?/.+?)/resolve/([^/]+)/(.+)$", path)
        if not m:
            return self._error(404, "RepoNotFound", f"no route {path}", head)
        repo_id, revision, filename = m.groups()
        repo = self.state.repos.get(repo_id)
        if repo is None or not self._authorized(repo):
            return self._error(404, "RepoNotFound", f"Repository {repo_id} not found", head)
        branch = repo["branches"].get(revision) or next(
            (b for b in repo["branches"].values() if b["sha"] == revision), None)
        if branch is None:
            return self._error(404, "RevisionNotFound", f"Revision {revision} not found", head)
        data = branch["files"].get(filename)
        if data is None:
            return self._error(404, "EntryNotFound", f"{filename} not found", head)
        etag = f'"{hashlib.sha256(data).hexdigest()}"'
        return self._send(200, data, {"X-Repo-Commit": branch["sha"], "ETag": etag}, head)


class LoopbackHub:
    """Runs the server in a thread on 127.0.0.1 and a free port; ``url`` is the HF_ENDPOINT to use."""

    def __init__(self) -> None:
        self.state = HubState()
        handler = type("BoundHandler", (Handler,), {"state": self.state})
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> LoopbackHub:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
