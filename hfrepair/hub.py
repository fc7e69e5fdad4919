"""Model references: Hub repo ids (``user/name`` or ``user/name@revision``) or local folders.

In: a reference string. Out: a local folder holding only what a merge needs (config,
safetensors weights and their index, preprocessing files), downloaded through
huggingface_hub's cache (``HF_TOKEN`` / ``hf auth login`` honoured), and where it came from
(repo id and the commit actually used). Pickle-only repos are refused before downloading.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from huggingface_hub import HfApi, constants, snapshot_download
from huggingface_hub.errors import (
    GatedRepoError,
    HfHubHTTPError,
    HFValidationError,
    HTTPError,
    LocalTokenNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import validate_repo_id

from .io import ModelLoadError

MODEL_FILES = [
    "config.json", "*.safetensors", "*.safetensors.index.json", "preprocessor_config.json",
    "generation_config.json", "tokenizer*", "special_tokens_map.json", "vocab*", "merges.txt",
    "README.md",  # read for the license only
]
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


@dataclass
class Source:
    """Where an input came from: a Hub repo at a commit, or a local path.

    ``folder`` is the local copy (for a Hub dataset, which is streamed, there is none).
    """

    reference: str
    folder: Path | None
    repo_id: str | None = None
    revision: str | None = None

    def to_dict(self) -> dict:
        return {"reference": self.reference, "repo_id": self.repo_id, "revision": self.revision}


def parse_reference(reference: str, kind: str = "model") -> tuple[str, str | None]:
    """(repo id, revision) of ``id@revision``; anything that is neither is a one-line error."""
    repo_id, _, revision = reference.partition("@")
    try:
        validate_repo_id(repo_id)
    except HFValidationError as error:
        raise HubAccessError(f"{reference!r} is neither a local {kind} folder nor a Hub repo id") from error
    return repo_id, revision or None


class HubAccessError(ValueError):
    """A Hub request that failed (missing repo or revision, token refused, server down)."""


def local_path_hint(reference: str) -> str:
    """For a reference that reads like a mistyped local path (its parent folder exists here:
    ``data/mnsit`` beside ``data/``), the words that say no such folder exists; else ""."""
    parent = Path(reference.partition("@")[0]).parent
    return f" (and there is no folder {reference!r} here)" if parent != Path(".") and parent.is_dir() else ""


def hub_error(error: Exception, what: str, reference: str = "") -> HubAccessError:
    """One-line explanation of a Hub failure for ``what`` (e.g. "model repo 'a/b'"), naming a
    local folder ``reference`` that does not exist where it reads like a path."""
    return HubAccessError(f"{_hub_failure(error, what)}{local_path_hint(reference)}")


def _hub_failure(error: Exception, what: str) -> str:
    endpoint = constants.ENDPOINT
    if isinstance(error, RevisionNotFoundError):
        return f"{what}: revision not found on {endpoint}"
    if isinstance(error, (RepositoryNotFoundError, GatedRepoError)):
        return (f"{what} not found on {endpoint}, or private and your token cannot read it "
                "(set HF_TOKEN or run `hf auth login`)")
    if isinstance(error, HfHubHTTPError):
        status = getattr(error.response, "status_code", None)
        if status in (401, 403):
            return f"{what}: access denied by {endpoint} (HTTP {status}); check your token"
        return f"{what}: {endpoint} answered HTTP {status}"
    return f"{what}: cannot reach the Hub at {endpoint} ({type(error).__name__})"


def resolve_model(reference: str, token: str | None = None, trust_remote_code: bool = False) -> Source:
    """A local folder for ``reference``, downloading from the Hub when it is not a folder.

    The repo's Python files are downloaded only with ``trust_remote_code``.
    """
    if Path(reference).is_dir():
        return Source(reference, Path(reference))
    repo_id, revision = parse_reference(reference)
    what = f"model repo {repo_id!r}" + (f" at {revision!r}" if revision else "")
    try:
        info = HfApi(token=token).model_info(repo_id, revision=revision)
        files = [sibling.rfilename for sibling in info.siblings or []]
        if not any(name.endswith(".safetensors") for name in files):
            pickles = [name for name in files if name.endswith(PICKLE_SUFFIXES)]
            if pickles:
                raise ModelLoadError(f"{what} has only pickle weights ({', '.join(pickles)}); hfrepair loads "
                                     "safetensors only (convert the checkpoint first)")
            raise ModelLoadError(f"{what} has no safetensors weights")
        patterns = MODEL_FILES + (["*.py"] if trust_remote_code else [])
        folder = snapshot_download(repo_id, revision=info.sha, allow_patterns=patterns, token=token)
    except (HTTPError, OSError) as error:
        raise hub_error(error, what, reference) from error
    return Source(reference, Path(folder), repo_id, info.sha)


def resolve_dataset(reference: str, token: str | None = None) -> Source:
    """A dataset reference pinned to the commit it resolves to now (local paths as they are).

    Reading both splits at that commit keeps a merge reproducible while the repo changes.
    """
    if Path(reference).is_dir():
        return Source(reference, Path(reference))
    if Path(reference).exists():
        raise HubAccessError(f"{reference} is a file; --dataset takes a dataset folder (its splits as files, "
                             "e.g. train.parquet and test.parquet) or a Hub repo id")
    repo_id, revision = parse_reference(reference, "dataset")
    what = f"dataset repo {repo_id!r}" + (f" at {revision!r}" if revision else "")
    try:
        info = HfApi(token=token).dataset_info(repo_id, revision=revision)
    except (HTTPError, OSError) as error:
        raise hub_error(error, what, reference) from error
    return Source(reference, None, repo_id, info.sha)


def read_license(folder: Path) -> str | None:
    """The license in a model folder's card metadata, if it has a card."""
    from huggingface_hub import ModelCard

    card = folder / "README.md"
    if not card.is_file():
        return None
    try:
        return ModelCard.load(card).data.license
    except (ValueError, OSError):
        return None


def check_push_target(repo_id: str) -> None:
    """Refuse a repo id the Hub would refuse, before any work that ends in a push."""
    try:
        validate_repo_id(repo_id)
    except HFValidationError as error:
        raise HubAccessError(f"cannot push to {repo_id!r}: not a valid Hub repo id ({str(error).splitlines()[0]})") \
            from error


def check_push_access(repo_id: str, token: str | None = None) -> None:
    """Refuse, before a merge, a push its token cannot make: no token, one the Hub does not
    accept, or a read-only one (asked of the Hub's ``whoami``). Without this a merge ran to
    the end and failed at the push. Whether the account may write to ``repo_id``'s
    namespace is left to the push itself: organisations and fine-grained tokens scope that
    in ways ``whoami`` does not fully say."""
    what = f"cannot push to {repo_id!r}"
    try:
        account = HfApi(token=token).whoami()
    except LocalTokenNotFoundError as error:
        raise HubAccessError(f"{what}: no Hub token (run `hf auth login` or set HF_TOKEN)") from error
    except (HTTPError, OSError) as error:
        raise hub_error(error, what) from error
    role = ((account.get("auth") or {}).get("accessToken") or {}).get("role")
    if role == "read":
        raise HubAccessError(f"{what}: the token of {account.get('name')!r} is read-only (a push needs a write token)")


def push_folder(folder: str | Path, repo_id: str, *, private: bool = False, revision: str | None = None,
                token: str | None = None, message: str = "Upload merged model (hfrepair)") -> str:
    """Create ``repo_id`` if needed and upload ``folder`` in one commit (all files or none)."""
    check_push_target(repo_id)
    api = HfApi(token=token)
    what = f"push to {repo_id!r}"
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        if revision:
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        commit = api.upload_folder(repo_id=repo_id, folder_path=str(folder), revision=revision,
                                   commit_message=message)
    except (HTTPError, OSError) as error:
        raise hub_error(error, what) from error
    except RuntimeError as error:  # a failed file upload, wrapping the HTTP error; nothing was committed
        if isinstance(error.__cause__, HTTPError):
            raise hub_error(error.__cause__, f"{what} (uploading failed, nothing committed)") from error
        raise
    return getattr(commit, "commit_url", None) or f"{constants.ENDPOINT}/{repo_id}"
