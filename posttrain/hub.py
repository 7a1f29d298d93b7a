"""Is a model named by hub id here, or fetchable? Found out in about a second, before any load.

transformers answers a hub id that cannot be fetched (no network, a typo, a private repo)
with an OSError traceback, after huggingface_hub has retried each file with backoff for
~25 s. Here the local cache is looked at first (a cached model loads offline); then, unless
HF_HUB_OFFLINE forbids the network, one metadata request without retries tells a missing
repo from an unreachable hub. Either way the user gets one line with the way out.
"""

from __future__ import annotations

import os

from posttrain.errors import PosttrainError

PROBE_TIMEOUT_S = 10.0
WAY_OUT = (
    "give a local path ({{path: /models/name}}), fix the id, or download it where there is network "
    "(`hf download {id}`) and run with HF_HUB_OFFLINE=1"
)
_FOUND: set[tuple[str, str | None]] = set()  # ids already found, so each is probed once per process


def check_model_id(repo_id: str, revision: str | None = None) -> None:
    """Return quietly when `repo_id` is in the local Hugging Face cache or on a reachable hub;
    otherwise raise a PosttrainError that names the id and what to do."""
    if (repo_id, revision) in _FOUND:
        return
    from huggingface_hub import try_to_load_from_cache
    from huggingface_hub.errors import HFValidationError

    fix = WAY_OUT.format(id=repo_id)
    try:
        cached = [try_to_load_from_cache(repo_id, f, revision=revision) for f in _CONFIGS]
    except HFValidationError as e:
        raise PosttrainError(
            f"'{repo_id}' is neither a local model folder nor a hub id ({e})", fix=fix
        ) from None
    if not any(isinstance(path, str) for path in cached):
        if offline():
            raise PosttrainError(
                f"model '{repo_id}' is not in the local Hugging Face cache, and HF_HUB_OFFLINE=1 "
                "forbids downloading it",
                fix=fix,
            )
        _probe(repo_id, revision, fix)
    _FOUND.add((repo_id, revision))


_CONFIGS = ("config.json", "adapter_config.json")


def offline() -> bool:
    from huggingface_hub import constants

    flag = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return constants.HF_HUB_OFFLINE or flag.upper() in {"1", "ON", "YES", "TRUE"}


def _probe(repo_id: str, revision: str | None, fix: str) -> None:
    """One request for the repo's metadata (huggingface_hub retries only downloads, not this)."""
    from huggingface_hub import model_info
    from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError

    try:
        model_info(repo_id, revision=revision, timeout=PROBE_TIMEOUT_S)
    except RepositoryNotFoundError:
        raise PosttrainError(
            f"no model '{repo_id}' on the Hugging Face Hub (a typo, or a private repo)",
            fix="check the id (owner/name), log in for a private one (`hf auth login`), or give a local path",
        ) from None
    except RevisionNotFoundError:
        raise PosttrainError(
            f"model '{repo_id}' has no revision '{revision}'", fix="check `revision:`"
        ) from None
    except HfHubHTTPError as e:
        status = getattr(getattr(e, "response", None), "status_code", "an error")
        raise PosttrainError(
            f"the Hugging Face Hub answered {status} for model '{repo_id}'", fix=fix
        ) from None
    except Exception as e:  # no network: DNS, connection refused, timeout (httpx's own error types)
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise PosttrainError(
            f"cannot reach the Hugging Face Hub for model '{repo_id}' ({reason})", fix=fix
        ) from None
