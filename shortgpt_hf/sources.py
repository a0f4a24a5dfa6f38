"""What a model name refers to. This is the one place that decides; every loader,
the card, push and the CLI ask `resolve`.

A name is read, in this order, as:

1. a built-in model (``smollm2-135m``, ``gemma3-270m``);
2. a local folder, whenever one exists at that path (local first: ``my-model``
   in the current directory is that folder, never a Hub id);
3. a path that does not exist, when it looks like one (it starts with ``.``,
   ``/`` or ``~``, or has more than one ``/``): an error, never a Hub lookup;
4. a Hub id, one word (``gpt2``) or ``org/name``, read through huggingface_hub.
   When ``HF_HUB_OFFLINE`` is set, or one quick request finds the Hub
   unreachable, only huggingface_hub's cache is read, so a missing model fails
   at once instead of after half a minute of retries.

What it holds is one of three kinds: a transformers ``model`` (``config.json``;
dense, or a full pruned checkpoint whose config carries ``shortgpt``), a
``recipe`` (``shortgpt_config.json``: a base plus the layers to remove), or a
PEFT ``adapter`` (``adapter_config.json``).

Records, adapters and recipes store a name that works from anywhere
(`Source.portable`): a built-in name, a Hub id, or an absolute path.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .builtin import BUILTINS, builtin_path
from .errors import InvalidRequest, ShortGPTError, SourceUnavailable, first_line

CONFIG_NAME = "shortgpt_config.json"
# The model_type of the small config.json that marks a recipe for transformers' AutoConfig (see auto.py).
RECIPE_MODEL_TYPE = "shortgpt_recipe"
ADAPTER_CONFIG = "adapter_config.json"
# from_pretrained arguments that say where and how to read a Hub repo.
HUB_KWARGS = ("token", "cache_dir", "local_files_only")


@functools.cache
def hub_reachable() -> bool:
    """Whether the Hub answers at all: one request, no retries (huggingface_hub's
    own downloads retry a refused connection for about 25 s)."""
    from huggingface_hub import constants
    from huggingface_hub.utils import get_session

    if constants.HF_HUB_OFFLINE:
        return False
    try:
        get_session().head(constants.ENDPOINT, timeout=5)
    except Exception:  # refused, timed out, no route, bad TLS: all mean "read the cache only"
        return False
    return True


def offline_reason() -> str:
    """Why only the cache is read, for messages."""
    from huggingface_hub import constants

    return "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else f"the Hub at {constants.ENDPOINT} cannot be reached"


def hub_file(repo_id: str, filename: str, revision: str | None = None, **hub_kwargs: Any) -> Path | None:
    """A file of a Hub repo through huggingface_hub (only its cache when the Hub is
    unreachable), or None when the repo, revision or file is not there."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        HfHubHTTPError,
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    kwargs = {k: v for k, v in hub_kwargs.items() if k in HUB_KWARGS and v is not None}
    if not hub_reachable():
        kwargs["local_files_only"] = True
    try:
        return Path(hf_hub_download(repo_id, filename, revision=revision, **kwargs))
    except GatedRepoError:  # a subclass of RepositoryNotFoundError, but the repo is there
        raise SourceUnavailable(
            f"{repo_id!r} is gated: accept its conditions on the Hub, then log in (`hf auth login`) or set HF_TOKEN"
        ) from None
    except (
        EntryNotFoundError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
        HFValidationError,
    ):
        return None
    except HfHubHTTPError as e:
        raise SourceUnavailable(f"the Hub failed to serve {repo_id}/{filename}: {first_line(e)}") from None


def looks_like_path(name: str) -> bool:
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or "\\" in name


def _valid_repo_id(name: str) -> bool:
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


@dataclass(frozen=True)
class Source:
    """A resolved name: where it lives (``builtin``, ``local`` or ``hub``), what it
    holds (``kind``), and how to read it."""

    name: str
    where: str
    kind: str
    revision: str | None = None  # the commit a Hub id resolved to
    pruned: bool = False  # a model whose config carries a ShortGPT record
    folder: Path | None = None  # a local folder, absolute
    hub: dict[str, Any] = field(default_factory=dict, compare=False)  # token, cache_dir...: how it was read

    @property
    def location(self) -> str:
        """What ``from_pretrained`` reads: a folder, or a Hub id."""
        if self.where == "builtin":
            return str(builtin_path(self.name))
        return str(self.folder) if self.where == "local" else self.name

    @property
    def portable(self) -> str:
        """The name to store in a record, an adapter or a recipe: it resolves from any directory."""
        return str(self.folder) if self.where == "local" else self.name

    def hub_kwargs(self) -> dict[str, Any]:
        """``from_pretrained`` arguments that read the same revision, from the cache when offline."""
        if self.where != "hub":
            return {}
        return self.hub | {"revision": self.revision} | ({} if hub_reachable() else {"local_files_only": True})

    def file(self, filename: str) -> Path | None:
        """One file of this folder or repo, or None."""
        if self.where == "hub":
            return hub_file(self.name, filename, self.revision, **self.hub)
        path = Path(self.location) / filename
        return path if path.is_file() else None

    def read_text(self, filename: str) -> str:
        """One file's text; a file that cannot be had (deleted, or refused by the Hub) is a one-line error."""
        path = self.file(filename)
        if path is None:
            raise SourceUnavailable(f"{self.describe()} has no readable {filename}")
        return path.read_text()

    def describe(self) -> str:
        """What this is, for messages: "the recipe folder /abs/x", "the PEFT adapter 'org/x' on the Hub"..."""
        what = {
            "model": "pruned checkpoint" if self.pruned else "dense model",
            "recipe": "recipe",
            "adapter": "PEFT adapter",
        }[self.kind]
        if self.where == "builtin":
            return f"the built-in {what} {self.name}"
        return f"the {what} folder {self.folder}" if self.where == "local" else f"the {what} {self.name!r} on the Hub"


def _classify_folder(name: str, folder: Path) -> Source:
    config = folder / "config.json"
    data = _read_json(config) if config.is_file() else None
    if (folder / ADAPTER_CONFIG).is_file() and data is None:
        return Source(name, "local", "adapter", folder=folder)
    if (folder / CONFIG_NAME).is_file() and (data is None or data.get("model_type") == RECIPE_MODEL_TYPE):
        return Source(name, "local", "recipe", folder=folder)
    if data is None:
        raise SourceUnavailable(
            f"{folder} is a folder, but not a model, recipe or PEFT adapter "
            f"(no config.json, {CONFIG_NAME} or {ADAPTER_CONFIG})"
        )
    return Source(name, "local", "model", pruned="shortgpt" in data, folder=folder)


def _classify_repo(name: str, revision: str | None, hub_kwargs: dict[str, Any]) -> Source:
    config = hub_file(name, "config.json", revision, **hub_kwargs)
    if config is not None:
        data = _read_json(config)
        kind = "recipe" if data.get("model_type") == RECIPE_MODEL_TYPE else "model"
        return Source(name, "hub", kind, revision=config.parent.name, pruned="shortgpt" in data, hub=hub_kwargs)
    for filename, kind in ((CONFIG_NAME, "recipe"), (ADAPTER_CONFIG, "adapter")):
        found = hub_file(name, filename, revision, **hub_kwargs)
        if found is not None:
            return Source(name, "hub", kind, revision=found.parent.name, hub=hub_kwargs)
    where = "on the Hub" if hub_reachable() else f"in the local Hugging Face cache ({offline_reason()})"
    at = f" at revision {revision}" if revision else ""
    raise SourceUnavailable(f"{name!r} is not a local folder, and no model, recipe or adapter{at} was found {where}")


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SourceUnavailable(f"{path} is not a readable JSON file: {e}") from None
    if not isinstance(data, dict):
        raise SourceUnavailable(f"{path} does not hold a JSON object")
    return data


def resolve(name: str | Path, revision: str | None = None, **hub_kwargs: Any) -> Source:
    """What ``name`` refers to (see the module docstring for the order of the rules)."""
    text = str(name)
    if not text:
        raise InvalidRequest("no model name given")
    if text in BUILTINS:
        return Source(text, "builtin", "model")
    path = Path(text).expanduser()
    if path.exists():
        if not path.is_dir():
            raise SourceUnavailable(f"{path} is a file; a model, recipe or adapter is a folder")
        return _classify_folder(text, path.resolve())
    if looks_like_path(text):
        raise SourceUnavailable(f"no such folder: {text}")
    if not _valid_repo_id(text):
        raise SourceUnavailable(
            f"{text!r} is neither a local folder, a built-in model ({', '.join(BUILTINS)}) nor a valid Hub id"
        )
    return _classify_repo(text, revision, {k: v for k, v in hub_kwargs.items() if k in HUB_KWARGS and v is not None})


def hub_id_of(name: str | None) -> str | None:
    """The Hub repo a recorded name stands for (a built-in's upstream repo), or None
    for a local folder; decided by the same rules as `resolve`, without asking the Hub."""
    if not name:
        return None
    if name in BUILTINS:
        return BUILTINS[name].hub_id
    if Path(name).expanduser().exists() or looks_like_path(name) or not _valid_repo_id(name):
        return None
    return name


def recorded_name(name_or_path: str | None, revision: str | None = None) -> tuple[str | None, str | None]:
    """``(portable name, Hub commit)`` of the model a record should name as its base
    (``revision``: the one it was loaded at, when known); a name that resolves to
    nothing (an in-memory model) is kept as it is."""
    if not name_or_path:
        return None, None
    try:
        source = resolve(name_or_path, revision)
    except ShortGPTError:
        return name_or_path, None
    return source.portable, source.revision
