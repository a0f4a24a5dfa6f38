"""A small in-memory fake of the Hugging Face Hub HTTP API, for tests.

It exists so that tests can drive the *real* ``huggingface_hub`` client (and
``transformers``, which downloads through it) end to end — create a repo,
upload through ``upload_folder``/``create_commit``, download with
``hf_hub_download``/``snapshot_download``/``from_pretrained`` — with no access
to huggingface.co. Point the client at it with ``HF_ENDPOINT`` (read when
``huggingface_hub`` is imported, so run the client in a subprocess), e.g.::

    with HubServer(token="hf_test") as hub:
        env = {**os.environ, "HF_ENDPOINT": hub.endpoint, "HF_TOKEN": "hf_test", "HF_HUB_OFFLINE": "0"}
        subprocess.run([sys.executable, "-c", code], env=env, check=True)
        assert hub.files("user/repo")["config.json"] == ...

Only model repos and only what those calls use are implemented. The preupload
endpoint answers "regular" for every file, so the client sends contents inline
(base64) in the commit NDJSON and never touches the LFS or Xet protocols, and
downloads carry no ``X-Xet-Hash`` header, so they stay plain HTTP GETs. Each
commit is applied atomically under one lock: all of it, or (on any error or
injected failure) none of it. Unknown requests get a 404 and a line on stderr.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import re
import secrets
import sys
import threading
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable
from urllib.parse import parse_qs, unquote, urlsplit


@dataclass(frozen=True)
class Commit:
    """One commit: ``files`` is the full snapshot after it, ``paths`` the paths it added or deleted."""

    sha: str
    message: str
    paths: tuple[str, ...]
    files: dict[str, bytes]
    parent: str | None
    date: str


@dataclass
class Repo:
    """A model repo: every commit by sha, and the refs (``main``, ``refs/pr/N``) pointing into them."""

    private: bool
    objects: dict[str, Commit] = field(default_factory=dict)
    refs: dict[str, str] = field(default_factory=dict)
    prs: list[str] = field(default_factory=list)  # titles; PR n (from 1) lives at refs/pr/n


class HubError(Exception):
    """An error answered the way the Hub does: status, ``X-Error-Code`` header and JSON ``{"error": ...}``."""

    def __init__(self, status: int, message: str, code: str | None = None, headers: dict[str, str] | None = None, **body: str):
        super().__init__(message)
        self.status, self.code, self.headers, self.body = status, code, headers or {}, body


def git_blob_sha(data: bytes) -> str:
    """The git blob id: the Hub's ETag for (non-LFS) files and the ``oid`` the client compares to skip unchanged files."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.000Z")


REPO = r"/api/models/(?P<repo>[^/]+/[^/]+)"


class HubServer:
    """The fake Hub, served from a daemon thread on 127.0.0.1; use as a context manager (or ``start``/``stop``).

    Attributes: ``endpoint`` (set once started), ``token`` (the one write token; any other bearer token gets a 401),
    ``user`` (the namespace of that token), ``fail_commits`` (the next n commit requests answer ``fail_status``,
    500 by default, and apply nothing), ``requests`` (``"METHOD /path"`` of every request, to assert on).
    Mind that ``upload_folder`` (with hf_xet installed) retries a 408/429/5xx commit up to 5 times (1+2+4+8+8 s
    of backoff) while ``create_commit`` does not: ``fail_commits = 1`` makes ``create_commit`` raise but only
    delays ``upload_folder``; to make it fail at once use a status it does not retry (e.g. ``fail_status = 507``).
    """

    def __init__(self, token: str = "hf_test", user: str = "tester", port: int = 0):
        self.token, self.user, self.port = token, user, port
        self.fail_commits, self.fail_status = 0, 500
        self.requests: list[str] = []
        self.endpoint = ""
        self._repos: dict[str, Repo] = {}
        self._lock = threading.RLock()
        self._httpd: ThreadingHTTPServer | None = None

    # ----- test-side API -----
    def start(self) -> HubServer:
        self._httpd = ThreadingHTTPServer(("127.0.0.1", self.port), _make_handler(self))
        self.endpoint = f"http://127.0.0.1:{self._httpd.server_address[1]}"
        threading.Thread(target=self._httpd.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()

    def __enter__(self) -> HubServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        """Path -> content at ``revision`` (a branch, ``refs/pr/N`` or a commit sha)."""
        with self._lock:
            return dict(self._commit_at(self._get_repo(repo_id), revision).files)

    def commits(self, repo_id: str, revision: str = "main") -> list[Commit]:
        """The history reaching ``revision``, oldest first; ``create_repo`` makes an empty "initial commit"."""
        with self._lock:
            repo = self._get_repo(repo_id)
            commit: Commit | None = self._commit_at(repo, revision)
            history = []
            while commit is not None:
                history.append(commit)
                commit = repo.objects[commit.parent] if commit.parent else None
            return history[::-1]

    # ----- state, always used under self._lock -----
    def _get_repo(self, repo_id: str, authed: bool = True) -> Repo:
        repo = self._repos.get(repo_id)
        if repo is None or (repo.private and not authed):
            raise HubError(404, f"Repository Not Found: {repo_id}", "RepoNotFound")
        return repo

    def _commit_at(self, repo: Repo, revision: str) -> Commit:
        sha = repo.refs.get(revision, revision)
        if sha not in repo.objects:
            raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        return repo.objects[sha]

    def _open_pr(self, repo: Repo, base: str, title: str) -> int:
        repo.prs.append(title)
        repo.refs[f"refs/pr/{len(repo.prs)}"] = base
        return len(repo.prs)

    def _add_commit(self, repo: Repo, ref: str, message: str, paths: list[str], files: dict[str, bytes]) -> Commit:
        commit = Commit(secrets.token_hex(20), message, tuple(paths), files, repo.refs.get(ref), _now())
        repo.objects[commit.sha] = commit
        repo.refs[ref] = commit.sha
        return commit


def _make_handler(hub: HubServer) -> type[BaseHTTPRequestHandler]:
    class Handler(_Handler):
        server_hub = hub

    return Handler


class _Handler(BaseHTTPRequestHandler):
    """Routes each request to a ``do_*`` method below; ``HubError`` becomes a Hub-style error response."""

    server_hub: HubServer
    routes: list[tuple[str, str, str]] = [
        ("GET", r"/api/whoami-v2", "whoami"),
        ("GET", r"/api/agent-harnesses", "agent_harnesses"),
        ("POST", r"/api/repos/create", "create_repo"),
        ("POST", r"/api/validate-yaml", "validate_yaml"),
        ("GET", REPO + r"(?:/revision/(?P<rev>[^/]+))?", "model_info"),
        ("GET", REPO + r"/tree/(?P<rev>[^/]+)(?:/(?P<path>.+))?", "tree"),
        ("POST", REPO + r"/preupload/(?P<rev>[^/]+)", "preupload"),
        ("POST", REPO + r"/commit/(?P<rev>[^/]+)", "commit"),
        ("POST", REPO + r"/discussions", "open_pr"),
        ("GET", REPO + r"/discussions/(?P<num>\d+)", "pr_details"),
        ("GET HEAD", r"/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<path>.+)", "resolve"),
    ]

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - base-class signature
        """Quiet: only unknown requests are logged (see ``_dispatch``)."""

    def do_GET(self) -> None:
        self._dispatch()

    do_HEAD = do_POST = do_PUT = do_DELETE = do_GET

    def _dispatch(self) -> None:
        hub = self.server_hub
        url = urlsplit(self.path)
        self.query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        self.body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        with hub._lock:
            hub.requests.append(f"{self.command} {url.path}")
        try:
            for methods, pattern, name in self.routes:
                match = re.fullmatch(pattern, url.path)
                if match and self.command in methods.split():
                    args = {k: unquote(v) for k, v in match.groupdict().items() if v is not None}
                    handler: Callable[..., None] = getattr(self, "do_" + name)
                    return handler(**args)
            print(f"hub_server: unhandled {self.command} {self.path}", file=sys.stderr)
            raise HubError(404, f"hub_server does not implement {self.command} {url.path}")
        except HubError as e:
            headers = {"X-Error-Message": str(e), **e.headers} | ({"X-Error-Code": e.code} if e.code else {})
            self._send(e.status, {"error": str(e), **e.body}, headers)

    def _send(self, status: int, payload: Any, headers: dict[str, str] | None = None) -> None:
        body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        self.send_response(status)
        if not isinstance(payload, bytes):
            self.send_header("Content-Type", "application/json")
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    # ----- auth -----
    def _authed(self) -> bool:
        """True for the server's token, False for none; any other token is rejected as the Hub does (401)."""
        auth = self.headers.get("Authorization")
        if auth is None:
            return False
        if auth != f"Bearer {self.server_hub.token}":
            raise HubError(401, "Invalid credentials in Authorization header")
        return True

    def _require_auth(self) -> None:
        if not self._authed():
            raise HubError(401, "You must be authenticated to access this resource (Authorization header missing)")

    # ----- endpoints -----
    def do_whoami(self) -> None:
        self._require_auth()
        name = self.server_hub.user
        token_info = {"displayName": "hub_server", "role": "write"}
        self._send(200, {"type": "user", "name": name, "fullname": name, "orgs": [], "auth": {"accessToken": token_info}})

    def do_agent_harnesses(self) -> None:
        """The client fetches this registry (to tag its user agent) on import; an empty one detects nothing."""
        self._send(200, {"standardEnvVars": [], "harnesses": {}})

    def do_create_repo(self) -> None:
        self._require_auth()
        hub, payload = self.server_hub, json.loads(self.body)
        if payload.get("type", "model") != "model":
            raise HubError(400, "hub_server only hosts model repos")
        repo_id = f"{payload.get('organization') or hub.user}/{payload['name']}"
        url = f"{hub.endpoint}/{repo_id}"
        with hub._lock:
            if repo_id in hub._repos:
                raise HubError(409, "You already created this model repo", url=url)  # create_repo(exist_ok) reads url
            repo = hub._repos[repo_id] = Repo(private=payload.get("visibility") == "private" or bool(payload.get("private")))
            hub._add_commit(repo, "main", "initial commit", [], {})
        self._send(200, {"url": url, "name": repo_id})

    def do_validate_yaml(self) -> None:
        self._authed()  # a wrong token is refused, as everywhere; with no YAML parser in the stdlib, any metadata passes
        self._send(200, {"errors": [], "warnings": []})

    def do_model_info(self, repo: str, rev: str = "main") -> None:
        hub = self.server_hub
        with hub._lock:
            state = hub._get_repo(repo, self._authed())
            commit = hub._commit_at(state, rev)
        siblings = [{"rfilename": p, "size": len(d), "blobId": git_blob_sha(d)} for p, d in sorted(commit.files.items())]
        info = {"id": repo, "modelId": repo, "author": repo.split("/")[0], "sha": commit.sha, "private": state.private}
        info |= {"gated": False, "disabled": False, "lastModified": commit.date, "createdAt": commit.date}
        self._send(200, info | {"tags": [], "downloads": 0, "likes": 0, "siblings": siblings})

    def do_tree(self, repo: str, rev: str, path: str = "") -> None:
        hub = self.server_hub
        with hub._lock:
            files = hub._commit_at(hub._get_repo(repo, self._authed()), rev).files
        prefix = path.strip("/") + "/" if path.strip("/") else ""
        entries: dict[str, dict[str, Any]] = {}
        for name, data in sorted(files.items()):
            if not name.startswith(prefix):
                continue
            parts = name[len(prefix) :].split("/")
            for depth in range(1, len(parts)):  # the folders on the way to this file
                folder = prefix + "/".join(parts[:depth])
                entries[folder] = {"type": "directory", "path": folder, "oid": git_blob_sha(folder.encode()), "size": 0}
                if self.query.get("recursive", "").lower() != "true":
                    break
            else:
                entries[name] = {"type": "file", "path": name, "oid": git_blob_sha(data), "size": len(data)}
        if prefix and not entries:
            raise HubError(404, f"Entry not found: {path}", "EntryNotFound")
        self._send(200, list(entries.values()))

    def do_resolve(self, repo: str, rev: str, path: str) -> None:
        hub = self.server_hub
        with hub._lock:
            commit = hub._commit_at(hub._get_repo(repo, self._authed()), rev)
        headers = {"X-Repo-Commit": commit.sha}
        if path not in commit.files:
            raise HubError(404, f"Entry not found: {path}", "EntryNotFound", headers)
        data = commit.files[path]
        self._send(200, data, headers | {"ETag": f'"{git_blob_sha(data)}"', "Content-Type": "application/octet-stream"})

    def do_preupload(self, repo: str, rev: str) -> None:
        self._require_auth()
        hub = self.server_hub
        with hub._lock:
            files = hub._commit_at(hub._get_repo(repo), rev).files
        answer = [
            {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False,
             "oid": git_blob_sha(files[f["path"]]) if f["path"] in files else None}
            for f in json.loads(self.body)["files"]
        ]  # fmt: skip
        self._send(200, {"files": answer})

    def do_commit(self, repo: str, rev: str) -> None:
        self._require_auth()
        hub = self.server_hub
        lines = [json.loads(line) for line in self.body.splitlines() if line.strip()]
        if not lines or lines[0]["key"] != "header":
            raise HubError(400, "The commit payload must start with a header line")
        header, create_pr = lines[0]["value"], self.query.get("create_pr") == "1"
        with hub._lock:  # held from the checks to the ref update: a commit applies entirely or not at all
            state = hub._get_repo(repo)
            if rev not in state.refs:  # commits go to a branch (or PR ref), never to a bare sha
                raise HubError(404, f"Invalid rev id: {rev}", "RevisionNotFound")
            if hub.fail_commits > 0:
                hub.fail_commits -= 1
                raise HubError(hub.fail_status, "Internal Error (injected by hub_server.fail_commits)")
            base = state.objects[state.refs[rev]]
            if parent := header.get("parentCommit"):  # PR: branch off it; else: it must still be the head
                base = next((c for sha, c in state.objects.items() if sha.startswith(parent)), None) if create_pr else base
                if base is None or not base.sha.startswith(parent):
                    raise HubError(412, "A commit has happened since. Please refresh and try again.")
            files, paths = dict(base.files), []
            for line in lines[1:]:
                key, target = line["key"], line["value"]["path"]
                if key == "file":
                    files[target] = base64.b64decode(line["value"]["content"])
                    paths.append(target)
                elif key in ("deletedFile", "deletedFolder"):
                    folder = target.rstrip("/") + "/"
                    gone = [p for p in files if p == target or (key == "deletedFolder" and p.startswith(folder))]
                    if not gone:
                        raise HubError(404, f"Entry not found: {target}", "EntryNotFound")
                    for p in gone:
                        del files[p]
                    paths.extend(gone)
                else:
                    raise HubError(400, f"hub_server does not accept {key!r} operations (it answers uploadMode=regular)")
            message = header["summary"] + (f"\n\n{header['description']}" if header.get("description") else "")
            if create_pr:
                num = hub._open_pr(state, base.sha, header["summary"])
                rev = f"refs/pr/{num}"
            commit = hub._add_commit(state, rev, message, paths, files)
        answer = {"success": True, "commitOid": commit.sha, "commitUrl": f"{hub.endpoint}/{repo}/commit/{commit.sha}"}
        if create_pr:
            answer["pullRequestUrl"] = f"{hub.endpoint}/{repo}/discussions/{num}"
        self._send(200, answer)

    def do_open_pr(self, repo: str) -> None:
        """``upload_folder(create_pr=True)`` opens the PR here first, then commits to ``refs/pr/<num>``."""
        self._require_auth()
        hub, payload = self.server_hub, json.loads(self.body)
        if not payload.get("pullRequest"):
            raise HubError(400, "hub_server only supports pull requests, not discussions")
        with hub._lock:
            state = hub._get_repo(repo)
            num = hub._open_pr(state, state.refs["main"], payload["title"])
        self._send(200, {"num": num})

    def do_pr_details(self, repo: str, num: str) -> None:
        hub = self.server_hub
        with hub._lock:
            prs = hub._get_repo(repo, self._authed()).prs
        if not 0 < int(num) <= len(prs):
            raise HubError(404, f"Discussion {num} not found")
        details = {"num": int(num), "title": prs[int(num) - 1], "status": "draft", "isPullRequest": True, "events": []}
        details |= {"createdAt": _now(), "author": {"name": hub.user}, "repo": {"name": repo, "type": "model"}}
        self._send(200, details | {"changes": {"base": "refs/heads/main"}, "filesWithConflicts": []})


def main() -> None:
    """Run the fake Hub in the foreground, for debugging a client against it by hand."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--token", default="hf_test")
    parser.add_argument("--user", default="tester")
    args = parser.parse_args()
    hub = HubServer(token=args.token, user=args.user, port=args.port).start()
    print(f"HF_ENDPOINT={hub.endpoint} HF_TOKEN={args.token}", flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        hub.stop()


if __name__ == "__main__":
    main()
