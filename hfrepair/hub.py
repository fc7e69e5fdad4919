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
    HTTPError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from .io import ModelLoadError

MODEL_FILES = [
    "config.json", "*.safetensors", "*.safetensors.index.json", "preprocessor_config.json",
    "generation_config.json", "tokenizer*", "special_tokens_map.json", "vocab*", "merges.txt",
    "README.md",  # read for the license only
]
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


@dataclass
class Source:
    """Where an endpoint came from: a Hub repo at a commit, or a local folder."""

    reference: str
    folder: Path
    repo_id: str | None = None
    revision: str | None = None

    def to_dict(self) -> dict:
        return {"reference": self.reference, "repo_id": self.repo_id, "revision": self.revision}


def parse_reference(reference: str) -> tuple[str, str | None]:
    repo_id, _, revision = reference.partition("@")
    return repo_id, revision or None


def hub_error(error: Exception, what: str) -> ModelLoadError:
    """One-line explanation of a Hub failure for ``what`` (e.g. "model repo 'a/b'")."""
    endpoint = constants.ENDPOINT
    if isinstance(error, RevisionNotFoundError):
        return ModelLoadError(f"{what}: revision not found on {endpoint}")
    if isinstance(error, (RepositoryNotFoundError, GatedRepoError)):
        return ModelLoadError(f"{what} not found on {endpoint}, or private and your token cannot read it "
                              "(set HF_TOKEN or run `hf auth login`)")
    if isinstance(error, HfHubHTTPError):
        status = getattr(error.response, "status_code", None)
        if status in (401, 403):
            return ModelLoadError(f"{what}: access denied by {endpoint} (HTTP {status}); check your token")
        return ModelLoadError(f"{what}: {endpoint} answered HTTP {status}")
    return ModelLoadError(f"{what}: cannot reach the Hub at {endpoint} ({type(error).__name__})")


def resolve_model(reference: str, token: str | None = None) -> Source:
    """A local folder for ``reference``, downloading from the Hub when it is not a folder."""
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
        folder = snapshot_download(repo_id, revision=info.sha, allow_patterns=MODEL_FILES, token=token)
    except (HTTPError, OSError) as error:
        raise hub_error(error, what) from error
    return Source(reference, Path(folder), repo_id, info.sha)


def dataset_source(reference: str) -> dict:
    """How a dataset reference is recorded: a Hub id, or a local path."""
    local = Path(reference).exists()
    return {"reference": reference, "repo_id": None if local else reference, "revision": None}


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


def push_folder(folder: str | Path, repo_id: str, *, private: bool = False, revision: str | None = None,
                token: str | None = None, message: str = "Upload merged model (hfrepair)") -> str:
    """Create ``repo_id`` if needed and upload ``folder`` in one commit (all files or none)."""
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
    return getattr(commit, "commit_url", None) or f"{constants.ENDPOINT}/{repo_id}"
