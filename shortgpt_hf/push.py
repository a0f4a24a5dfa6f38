"""Publishing pruned models to the Hugging Face Hub with a real model card.

transformers' own ``push_to_hub`` writes its default README.md, so we build
the whole folder ourselves (checkpoint or recipe, tokenizer, card, score
chart) and upload it in ONE commit with ``HfApi.upload_folder``: the repo is
never left with a model and no card, or a card and no model.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any

from torch import nn

from .card import CHART, merge_into_existing, model_card, scores_chart, split_adapter
from .config import ShortGPTConfig
from .errors import InvalidRequest, ShortGPTError, SourceUnavailable, fault, first_line
from .sources import hub_file, hub_reachable, offline_reason, resolve

logger = logging.getLogger("shortgpt_hf")

KINDS = ("full", "recipe")


def _check_target(repo_id: str, token: str | None) -> str:
    """Refuse a bad repo id or a missing token before any work is done."""
    from huggingface_hub import get_token
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        raise InvalidRequest(f"invalid repo id {repo_id!r}: {str(e).splitlines()[0]}") from None
    if "/" not in repo_id:
        raise InvalidRequest(f"repo id {repo_id!r} needs a namespace: 'user-or-org/name'")
    token = token or get_token()
    if not token:
        raise InvalidRequest("no Hugging Face token: run `hf auth login` or set HF_TOKEN")
    return token


def _check_reachable(repo_id: str) -> None:
    """Before any work, and instead of half a minute of retries."""
    if not hub_reachable():
        raise SourceUnavailable(f"cannot push to {repo_id}: {offline_reason()}")


def _existing_card(repo_id: str, revision: str | None, token: str) -> str | None:
    readme = hub_file(repo_id, "README.md", revision, token=token)
    return readme.read_text() if readme is not None else None


def push_to_hub(
    model_or_dir: nn.Module | str | Path,
    repo_id: str,
    kind: str = "full",
    *,
    private: bool = False,
    token: str | None = None,
    revision: str | None = None,
    commit_message: str | None = None,
    create_pr: bool = False,
    tokenizer: Any = None,
    eval_results: list[dict[str, Any]] | None = None,
) -> str:
    """Upload a pruned model (in memory, or a saved checkpoint / recipe folder) with
    its card and score chart in one commit; returns the commit (or PR) URL.

    ``kind="recipe"`` uploads only the recipe (plus tokenizer and card) even for a
    full model; a recipe folder is always pushed as a recipe.
    """
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    from .saving import write_checkpoint, write_recipe

    if kind not in KINDS:
        raise InvalidRequest(f"kind must be one of {KINDS}, got {kind!r}")
    token = _check_target(repo_id, token)
    if not isinstance(model_or_dir, (str, Path)) and ShortGPTConfig.from_model(split_adapter(model_or_dir)[0]) is None:
        raise InvalidRequest("this model has not been pruned: nothing to push as a ShortGPT model")
    source = None
    if isinstance(model_or_dir, (str, Path)):
        from .loading import load_pruned, skeleton
        from .reading import load_tokenizer

        source = resolve(model_or_dir)
        if source.kind == "adapter" or not (source.kind == "recipe" or source.pruned):
            raise InvalidRequest(
                f"{source.describe()} is not a pruned model: prune it first (shortgpt prune), "
                "then push the folder it writes"
            )
        if source.kind == "recipe":
            kind = "recipe"
        _check_reachable(repo_id)
        # A local checkpoint is uploaded as its files and a recipe needs no weights: the card
        # only needs the architecture, so build it on the meta device instead of reading every tensor.
        model = skeleton(source) if source.where == "local" or kind == "recipe" else load_pruned(source)
        if tokenizer is None:
            try:
                tokenizer = load_tokenizer(source)
            except ShortGPTError:  # a checkpoint saved without its tokenizer is pushed without one
                pass
    else:
        model = model_or_dir
        if tokenizer is None:  # the one saved where the model was loaded from, so the repo is usable as pushed
            from .reading import tokenizer_for

            try:
                tokenizer = tokenizer_for(split_adapter(model)[0])
            except ShortGPTError:
                logger.warning("no tokenizer given and none saved with the model: the repo is pushed without one")
        _check_reachable(repo_id)
    record = ShortGPTConfig.from_model(split_adapter(model)[0])

    api = HfApi(token=token)
    with tempfile.TemporaryDirectory(prefix="shortgpt-push-") as tmp:
        folder = Path(tmp) / "repo"
        folder.mkdir()
        if kind == "recipe":
            write_recipe(split_adapter(model)[0], folder, tokenizer)
        elif source is not None and source.where == "local":
            shutil.copytree(source.folder, folder, dirs_exist_ok=True)  # the user's checkpoint, byte for byte
        else:
            write_checkpoint(model, folder, tokenizer)
        chart = scores_chart(record, folder / CHART)
        try:
            card_kind = "adapter" if split_adapter(model)[1] is not None else kind
            card = model_card(model, eval_results, repo_id=repo_id, kind=card_kind, chart=CHART if chart else None)
            card = merge_into_existing(card, _existing_card(repo_id, revision, token))
            (folder / "README.md").write_text(str(card))
            api.create_repo(repo_id, private=private, exist_ok=True)
            info = api.upload_folder(
                repo_id=repo_id,
                folder_path=folder,
                revision=revision,
                commit_message=commit_message
                or (
                    f"Upload ShortGPT-pruned model ({len(record.removed_layers)} of "
                    f"{record.original_num_hidden_layers} layers "
                    f"{'skipped in prefill' if record.mode == 'prefill_skip' else 'removed'})"
                ),
                create_pr=create_pr,
            )
        except HfHubHTTPError as e:
            raise SourceUnavailable(f"upload to {repo_id} failed: {first_line(e)}") from None
        except Exception as e:  # the connection dropped mid-upload, or the Hub went offline
            if fault(e) is None:
                raise
            raise SourceUnavailable(f"upload to {repo_id} failed: {fault(e)}; nothing was committed") from None
    return info.pr_url if create_pr and info.pr_url else info.commit_url
