"""A small in-memory fake of the Hugging Face Hub HTTP API, for tests.

It exists so that tests drive the *real* ``huggingface_hub`` client (and ``transformers``, which downloads through
it) end to end — create_repo, upload_folder/create_commit, hf_hub_download/snapshot_download/from_pretrained —
with no access to huggingface.co. ``HF_ENDPOINT`` is read when huggingface_hub is imported: run the client in a
subprocess::

    with HubServer(token="hf_test") as hub:  # HF_HOME too, or the client caches the fake's answers in ~/.cache
        env = {**os.environ, "HF_ENDPOINT": hub.endpoint, "HF_TOKEN": "hf_test", "HF_HOME": str(tmp_path),
               "HF_HUB_OFFLINE": "0"}
        subprocess.run([sys.executable, "-c", code], env=env, check=True)
        assert hub.files("tester/repo")["config.json"] == ...

Only model repos, and only what those calls use, are implemented. Preupload answers "regular" for every file, so
the client sends contents inline (base64) in the commit NDJSON and never takes the LFS or Xet paths (both are only
for "lfs" files); downloads carry no ``X-Xet-Hash`` header, so they stay plain HTTP GETs. A commit applies under
one lock, entirely or (on any error or injected failure) not at all. Unknown requests get a 404 and a stderr line.
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
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit


@dataclass(frozen=True)
class Commit:
    """One commit: ``files`` is the full snapshot after it, ``paths`` the paths it added or deleted."""

    sha: str
    message: str
    paths: tuple[str, ...]
    files: dict[str, bytes]
    parent: str | None


@dataclass
class Repo:
    """A model repo: its commits by sha and its refs (``main``, ``refs/pr/N``) pointing into them."""

    private: bool
    objects: dict[str, Commit] = field(default_factory=dict)
    refs: dict[str, str] = field(default_factory=dict)
    prs: list[str] = field(default_factory=list)  # titles; PR n (from 1) is refs/pr/n


class HubError(Exception):
    """An error answered as the Hub does: ``X-Error-Code`` (mapped to the client's exception classes) and more."""

    def __init__(self, status: int, message: str, code: str | None = None, headers: dict | None = None, **body: str):
        super().__init__(message)
        self.status, self.code, self.headers, self.body = status, code, headers or {}, body


def git_blob_sha(data: bytes) -> str:
    """The git blob id: the Hub's ETag of a (non-LFS) file, and the ``oid`` the client compares to skip it."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class HubServer:
    """The fake Hub, served on 127.0.0.1 from a daemon thread; use it as a context manager (or ``start``/``stop``).

    ``endpoint``: set once started. ``token``: the one valid token (writes need it, private repos are invisible
    without it, any other bearer token gets a 401). ``user``: its namespace. ``requests``: "METHOD /path" of each
    request. ``fail_commits``: the next n commit requests answer ``fail_status`` (500) and apply nothing. Mind that
    with hf_xet installed ``upload_folder`` retries a 408/429/5xx commit 5 times (1+2+4+8+8 s): ``fail_commits = 1``
    only delays it (``fail_status = 507`` fails it at once); ``create_commit``, and ``upload_folder`` under
    ``HF_HUB_DISABLE_XET=1`` (one plain create_commit), do not retry.
    """

    def __init__(self, token: str = "hf_test", user: str = "tester", port: int = 0):
        self.token, self.user, self.port = token, user, port
        self.fail_commits, self.fail_status = 0, 500
        self.requests: list[str] = []
        self.endpoint = ""
        self._repos: dict[str, Repo] = {}
        self._lock = threading.RLock()
        self._httpd: ThreadingHTTPServer | None = None

    def start(self) -> HubServer:
        self._httpd = ThreadingHTTPServer(("127.0.0.1", self.port), type("Handler", (_Handler,), {"hub": self}))
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
            return dict(self._commit_at(self._repo(repo_id), revision).files)

    def commits(self, repo_id: str, revision: str = "main") -> list[Commit]:
        """The history reaching ``revision``, oldest first; ``create_repo`` makes an empty "initial commit"."""
        with self._lock:
            repo, history = self._repo(repo_id), [self._commit_at(self._repo(repo_id), revision)]
            while history[-1].parent is not None:
                history.append(repo.objects[history[-1].parent])
            return history[::-1]

    # The helpers below are called with self._lock held.
    def _repo(self, repo_id: str, authed: bool = True) -> Repo:
        repo = self._repos.get(repo_id)
        if repo is None or (repo.private and not authed):
            raise HubError(404, f"Repository not found: {repo_id}", "RepoNotFound")
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
        commit = Commit(secrets.token_hex(20), message, tuple(paths), files, repo.refs.get(ref))
        repo.objects[commit.sha] = commit
        repo.refs[ref] = commit.sha
        return commit


REPO = r"/api/models/(?P<repo>[^/]+/[^/]+)"


class _Handler(BaseHTTPRequestHandler):
    """Routes each request to an ``on_*`` method; a ``HubError`` raised there becomes the error response."""

    hub: HubServer
    routes = [  # (methods, regex on the still-quoted path, handler); groups are unquoted and passed as arguments
        ("GET HEAD", r"/", "home"),
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

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (base-class signature)
        """Quiet: only unknown requests are logged, by ``do_GET``."""

    def do_GET(self) -> None:
        url = urlsplit(self.path)
        self.query = {key: values[-1] for key, values in parse_qs(url.query).items()}
        self.body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        with self.hub._lock:
            self.hub.requests.append(f"{self.command} {url.path}")
        try:
            for methods, pattern, name in self.routes:
                if self.command in methods.split() and (match := re.fullmatch(pattern, url.path)):
                    args = {key: unquote(value) for key, value in match.groupdict().items() if value is not None}
                    return getattr(self, f"on_{name}")(**args)
            print(f"hub_server: no endpoint for {self.command} {self.path}", file=sys.stderr)
            raise HubError(404, f"hub_server does not implement {self.command} {url.path}")
        except HubError as e:
            headers = {"X-Error-Message": str(e), **({"X-Error-Code": e.code} if e.code else {}), **e.headers}
            self._send(e.status, {"error": str(e), **e.body}, headers)

    do_HEAD = do_POST = do_PUT = do_DELETE = do_GET

    def _send(self, status: int, payload: Any, headers: dict[str, str] | None = None) -> None:
        """Send JSON, or raw bytes (a file); a HEAD gets the same headers with no body."""
        raw = isinstance(payload, bytes)
        body = payload if raw else json.dumps(payload).encode()
        self.send_response(status)
        headers = {"Content-Type": "application/octet-stream" if raw else "application/json", **(headers or {})}
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _authed(self, required: bool = False) -> bool:
        """True for the server's token, False for none (401 if ``required``); any other token is refused (401)."""
        auth = self.headers.get("Authorization")
        if auth is not None and auth != f"Bearer {self.hub.token}":
            raise HubError(401, "Invalid credentials in Authorization header")
        if required and auth is None:
            raise HubError(401, "You must be authenticated to access this resource (Authorization header missing)")
        return auth is not None

    def _snapshot(self, repo: str, rev: str) -> Commit:
        with self.hub._lock:
            return self.hub._commit_at(self.hub._repo(repo, self._authed()), rev)

    def on_whoami(self) -> None:
        self._authed(required=True)
        user, token = self.hub.user, {"displayName": "hub_server", "role": "write"}
        self._send(200, {"type": "user", "name": user, "fullname": user, "orgs": [], "auth": {"accessToken": token}})

    def on_home(self) -> None:
        """The front page: shortgpt_hf asks for it once to learn whether the Hub can be reached at all."""
        self._send(200, b"hub_server")

    def on_agent_harnesses(self) -> None:
        """Fetched by the client to tag its user agent; an empty registry detects no agent."""
        self._send(200, {"standardEnvVars": [], "harnesses": {}})

    def on_create_repo(self) -> None:
        self._authed(required=True)
        payload = json.loads(self.body)
        repo_id = f"{payload.get('organization') or self.hub.user}/{payload['name']}"
        url = f"{self.hub.endpoint}/{repo_id}"
        with self.hub._lock:
            if repo_id in self.hub._repos:  # create_repo(exist_ok=True) accepts the 409 and reads its url
                raise HubError(409, "You already created this model repo", url=url)
            repo = self.hub._repos[repo_id] = Repo(private=payload.get("visibility") == "private")
            self.hub._add_commit(repo, "main", "initial commit", [], {})
        self._send(200, {"url": url, "name": repo_id})

    def on_validate_yaml(self) -> None:
        """Called before uploading a README.md; with no YAML parser in the stdlib, any metadata passes."""
        self._authed()
        self._send(200, {"errors": [], "warnings": []})

    def on_model_info(self, repo: str, rev: str = "main") -> None:
        commit = self._snapshot(repo, rev)
        siblings = [{"rfilename": p, "size": len(d), "blobId": git_blob_sha(d)} for p, d in commit.files.items()]
        info = {"id": repo, "modelId": repo, "author": repo.split("/")[0], "sha": commit.sha, "siblings": siblings}
        self._send(
            200, info | {"private": self.hub._repos[repo].private, "gated": False, "disabled": False, "tags": []}
        )

    def on_tree(self, repo: str, rev: str, path: str = "") -> None:
        """The entries under ``path``: its direct children, or with ``recursive`` every file and folder below."""
        files, recursive = self._snapshot(repo, rev).files, self.query.get("recursive", "").lower() == "true"
        prefix = path.strip("/") + "/" if path.strip("/") else ""
        entries: dict[str, dict[str, Any]] = {}
        for name, data in sorted(files.items()):
            parts = name[len(prefix) :].split("/") if name.startswith(prefix) else []
            for depth in range(1, len(parts) + 1):
                entry = "/".join([prefix.rstrip("/"), *parts[:depth]]).lstrip("/")
                is_file = depth == len(parts)
                oid, size = (git_blob_sha(data), len(data)) if is_file else (git_blob_sha(entry.encode()), 0)
                entries[entry] = {"type": "file" if is_file else "directory", "path": entry, "oid": oid, "size": size}
                if not recursive:
                    break
        if prefix and not entries:
            raise HubError(404, f"Entry not found: {path}", "EntryNotFound")
        self._send(200, list(entries.values()))

    def on_resolve(self, repo: str, rev: str, path: str) -> None:
        """``hf_hub_download`` HEADs then GETs: it needs ``X-Repo-Commit`` and ``ETag`` (the cache is keyed on them);
        a missing file is an ``EntryNotFound`` that still names the commit (cached as absent)."""
        commit = self._snapshot(repo, rev)
        if path not in commit.files:
            raise HubError(404, f"Entry not found: {path}", "EntryNotFound", {"X-Repo-Commit": commit.sha})
        data = commit.files[path]
        self._send(200, data, {"X-Repo-Commit": commit.sha, "ETag": f'"{git_blob_sha(data)}"'})

    def on_preupload(self, repo: str, rev: str) -> None:
        """Every file is "regular"; ``oid`` lets the client drop the files that did not change."""
        self._authed(required=True)
        files = self._snapshot(repo, rev).files
        answer = [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False,
                   "oid": git_blob_sha(files[f["path"]]) if f["path"] in files else None}
                  for f in json.loads(self.body)["files"]]  # fmt: skip
        self._send(200, {"files": answer})

    def on_commit(self, repo: str, rev: str) -> None:
        """Apply the NDJSON commit (header, then file / deletedFile / deletedFolder lines) to branch ``rev``, or to a
        new PR branched off it with ``?create_pr=1``; the lock is held from the checks to the ref update."""
        self._authed(required=True)
        lines = [json.loads(line) for line in self.body.splitlines() if line.strip()]
        header, create_pr, hub = lines[0]["value"], self.query.get("create_pr") == "1", self.hub
        with hub._lock:
            state = hub._repo(repo)
            if rev not in state.refs:  # commits go to a branch or a PR, never to a bare sha
                raise HubError(404, f"Invalid rev id: {rev}", "RevisionNotFound")
            if hub.fail_commits > 0:
                hub.fail_commits -= 1
                raise HubError(hub.fail_status, "Internal Error (injected by hub_server.fail_commits)")
            base = state.objects[state.refs[rev]]
            if (parent := header.get("parentCommit")) and not base.sha.startswith(parent):
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
                    files, paths = {p: d for p, d in files.items() if p not in gone}, paths + gone
                else:
                    raise HubError(400, f"hub_server does not accept {key!r} lines (it asks for regular uploads)")
            if create_pr:
                rev = f"refs/pr/{hub._open_pr(state, base.sha, header['summary'])}"
            message = header["summary"] + (f"\n\n{header['description']}" if header.get("description") else "")
            commit = hub._add_commit(state, rev, message, paths, files)
        answer = {"commitOid": commit.sha, "commitUrl": f"{hub.endpoint}/{repo}/commit/{commit.sha}"}
        if create_pr:
            answer["pullRequestUrl"] = f"{hub.endpoint}/{repo}/discussions/{len(state.prs)}"
        self._send(200, answer)

    def on_open_pr(self, repo: str) -> None:
        """``upload_folder(create_pr=True)`` opens the PR here, reads it back, then commits to ``refs/pr/<num>``."""
        self._authed(required=True)
        payload = json.loads(self.body)
        if not payload.get("pullRequest"):
            raise HubError(400, "hub_server only supports pull requests, not discussions")
        with self.hub._lock:
            state = self.hub._repo(repo)
            num = self.hub._open_pr(state, state.refs["main"], payload["title"])
        self._send(200, {"num": num})

    def on_pr_details(self, repo: str, num: str) -> None:
        with self.hub._lock:
            prs = self.hub._repo(repo, self._authed()).prs
        if not 0 < int(num) <= len(prs):
            raise HubError(404, f"Discussion {num} not found")
        details = {"num": int(num), "title": prs[int(num) - 1], "isPullRequest": True, "status": "draft", "events": []}
        details |= {"createdAt": time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime()), "filesWithConflicts": []}
        details |= {"author": {"name": self.hub.user}, "repo": {"name": repo, "type": "model"}}
        self._send(200, details | {"changes": {"base": "refs/heads/main"}})


def main() -> None:
    """Serve in the foreground, to debug a client by hand: ``python tests/hub_server.py --port P --token T``."""
    parser = argparse.ArgumentParser(description="Serve the fake Hugging Face Hub until Ctrl-C.")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--token", default="hf_test")
    parser.add_argument("--user", default="tester")
    args = parser.parse_args()
    with HubServer(token=args.token, user=args.user, port=args.port) as hub:
        print(f"HF_ENDPOINT={hub.endpoint} HF_TOKEN={args.token}", flush=True)
        try:
            threading.Event().wait()
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    main()
