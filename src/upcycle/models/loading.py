"""Loading models by name for every command: a local folder (``~`` expanded) or a hub id.

One place decides whether a name is a path, whether the Hugging Face Hub can be asked at all, and turns
loader exceptions into one-line errors, so that ``convert``, ``pretrain``, ``finetune``, ``evaluate`` and
``analyze`` behave alike (issue 11):

- a name that can only be a path and does not exist: "no such model folder";
- a name that is not a local folder while the Hub is offline (``HF_HUB_OFFLINE``) or does not answer one
  quick request: "no local folder 'dnese', and the hub could not be reached", at once instead of after
  tens of seconds of retries; a model already in the local Hub cache still loads (offline mode);
- a truncated or corrupt ``*.safetensors`` file: one line naming the file.

``first_line`` and ``looks_like_path`` are the package's only helpers of their kind (they live in the
light modules ``upcycle.config`` and ``upcycle.io`` and are re-exported here).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from pathlib import Path

from upcycle.config import ConfigError, UserError, first_line
from upcycle.io import expand_path, looks_like_path

#: Seconds the Hub gets to answer the reachability probe (a firewalled cluster drops packets silently).
HUB_PROBE_TIMEOUT = 3.0
_hub_answered: bool | None = None


def _offline_env() -> bool:
    return any(
        os.environ.get(var, "").strip().upper() in ("1", "ON", "YES", "TRUE")
        for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    )


def _probe_hub() -> bool:
    """One request to the Hub endpoint with a short timeout and no retries: any HTTP answer counts."""
    from huggingface_hub import constants
    from huggingface_hub.utils import get_session

    endpoint = os.environ.get("HF_ENDPOINT") or constants.ENDPOINT
    try:
        get_session().head(endpoint, timeout=HUB_PROBE_TIMEOUT, follow_redirects=False)
    except Exception:
        return False
    return True


def _enter_offline_mode() -> None:
    """The runtime form of ``HF_HUB_OFFLINE=1``: loaders read the local cache instead of retrying a Hub
    that did not answer (huggingface_hub and datasets read the variable once, at import)."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    from huggingface_hub import constants

    constants.HF_HUB_OFFLINE = True
    datasets_config = sys.modules.get("datasets.config")
    if datasets_config is not None:
        datasets_config.HF_HUB_OFFLINE = True


def hub_offline() -> str | None:
    """Why the Hub cannot be used ("HF_HUB_OFFLINE is set", "no answer from https://huggingface.co"), or
    None when it can. The Hub is asked once per process, with a short timeout; without an answer the
    process switches to offline mode."""
    global _hub_answered
    if _hub_answered is None and _offline_env():
        return "offline mode: HF_HUB_OFFLINE is set"
    if _hub_answered is None:
        _hub_answered = _probe_hub()
        if not _hub_answered:
            _enter_offline_mode()
    if _hub_answered:
        return None
    from huggingface_hub import constants

    return (
        f"no answer from {os.environ.get('HF_ENDPOINT') or constants.ENDPOINT} within {HUB_PROBE_TIMEOUT:g} s"
    )


def in_hub_cache(repo_id: str, filenames: Sequence[str] = ("config.json",), repo_type: str = "model") -> bool:
    """Whether one of ``filenames`` of the hub repository is in the local Hub cache."""
    from huggingface_hub import try_to_load_from_cache

    for filename in filenames:
        try:
            if isinstance(try_to_load_from_cache(repo_id, filename, repo_type=repo_type), str):
                return True
        except Exception:  # not a valid repo id
            return False
    return False


def check_hub_name(
    name: str,
    *,
    flag: str = "model",
    filenames: Sequence[str] = ("config.json",),
    repo_type: str = "model",
    local: str = "folder",
) -> None:
    """A name that is not local must be on a reachable Hub, or in the local Hub cache; otherwise a
    one-line error now, not after tens of seconds of retries."""
    why = hub_offline()
    if why and not in_hub_cache(name, filenames, repo_type):
        raise ConfigError(flag, name, f"no local {local} '{name}', and the hub could not be reached ({why})")


def check_tokenizer_name(name: str, *, flag: str = "tokenizer") -> None:
    """A tokenizer name is GPT-2's (built offline), a local folder, or a reachable (or cached) hub id."""
    from upcycle.data.tokenizers import GPT2_TOKENIZER_NAMES, TOKENIZER_FILES

    if name in GPT2_TOKENIZER_NAMES or expand_path(name).is_dir():
        return
    if looks_like_path(name):
        raise ConfigError(flag, name, "no such folder")
    check_hub_name(name, flag=flag, filenames=TOKENIZER_FILES)


def check_dataset_name(name: str, *, flag: str = "data", local: str = "folder") -> None:
    """A dataset name that is not a path must be a reachable (or cached) hub dataset; local names are
    checked where they are read (their folders, files and columns)."""
    if not looks_like_path(name):
        check_hub_name(name, flag=flag, filenames=("README.md",), repo_type="dataset", local=local)


def check_weight_files(folder: str | os.PathLike) -> None:
    """Read the header of every ``*.safetensors`` file in ``folder`` (cheap: no tensor is loaded); a
    truncated or corrupt file is a one-line error naming it."""
    from safetensors import SafetensorError, safe_open

    for path in sorted(Path(folder).glob("*.safetensors")):
        try:
            with safe_open(str(path), framework="numpy"):
                pass
        except (SafetensorError, OSError) as exc:
            raise UserError(
                f"{path}: not a readable safetensors file, truncated or corrupt ({first_line(exc)})"
            ) from None


def model_source(name: str, *, flag: str = "model", check_weights: bool = False, hub: bool = True) -> str:
    """What to pass to ``from_pretrained``: the expanded folder, or the hub id unchanged.

    ``check_weights`` also reads the headers of the folder's safetensors files; ``hub=False`` refuses
    anything but a local folder.
    """
    if not isinstance(name, str) or not name.strip():
        raise ConfigError(flag, name, "give a model folder or a hub id")
    path = expand_path(name)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ConfigError(flag, name, "the folder has no config.json (not a Hugging Face model folder)")
        if check_weights:
            check_weight_files(path)
        return str(path)
    if path.exists():
        raise ConfigError(flag, name, "is a file; give a model folder or a hub id")
    if looks_like_path(name) or not hub:
        raise ConfigError(flag, name, "no such model folder")
    check_hub_name(name, flag=flag)
    return name


def load_errors() -> tuple[type[BaseException], ...]:
    """Exceptions a loader raises for unreadable files or names (not bugs): caught and shown as one line."""
    import pickle

    from safetensors import SafetensorError

    return (OSError, ValueError, RuntimeError, EOFError, KeyError, pickle.UnpicklingError, SafetensorError)


def load_causal_lm(name: str, *, flag: str = "model", dtype=None, presets: bool = True):
    """A causal LM from a folder (upcycled or dense), a model preset (from scratch, see
    ``upcycle.models.presets``) or a hub id; float32 unless ``dtype`` says otherwise."""
    import torch
    from transformers import AutoModelForCausalLM

    import upcycle.models.modeling  # noqa: F401  (registers the MoE model types)
    from upcycle.models.presets import PRESETS, build_model

    if presets and name in PRESETS and not expand_path(name).is_dir():
        return build_model(name)
    source = model_source(name, flag=flag, check_weights=True)
    try:
        return AutoModelForCausalLM.from_pretrained(source, dtype=dtype or torch.float32)
    except load_errors() as exc:
        raise UserError(f"cannot load model '{name}': {first_line(exc)}") from exc


def load_classifier(
    name: str,
    label_names: Sequence[str] | None = None,
    *,
    flag: str = "model",
    pad_token_id: int | None = None,
):
    """A sequence classifier in float32 from any checkpoint ``AutoModelForSequenceClassification`` loads
    after ``import upcycle`` (an upcycled folder, a dense hub id or folder, a native Mixtral / Qwen2-MoE
    export, or an already fine-tuned classifier).

    ``label_names`` sets a fresh head's labels (id2label/label2id); None keeps the checkpoint's (an
    evaluation of a fine-tuned model). A model without a pad token gets ``pad_token_id`` or its EOS id:
    GPT-2 has none, and batched classification needs one.
    """
    import torch
    from transformers import AutoConfig, AutoModelForSequenceClassification

    import upcycle.models.modeling  # noqa: F401  (registers the MoE model types)

    source = model_source(name, flag=flag, check_weights=True)
    try:
        config = AutoConfig.from_pretrained(source)
    except load_errors() as exc:
        raise UserError(f"cannot read the model config of '{name}': {first_line(exc)}") from exc
    if label_names is not None:
        config.num_labels = len(label_names)
        config.id2label = dict(enumerate(label_names))
        config.label2id = {n: i for i, n in enumerate(label_names)}
    # getattr: some configs (ViT, CodeGen in transformers 5) have no pad/eos attribute at all.
    if getattr(config, "pad_token_id", None) is None:
        eos = getattr(config, "eos_token_id", None)
        eos = eos[0] if isinstance(eos, list) else eos
        config.pad_token_id = pad_token_id if pad_token_id is not None else eos
    try:
        model = AutoModelForSequenceClassification.from_pretrained(source, config=config, dtype=torch.float32)
    except ValueError as exc:  # an architecture without a sequence-classification class
        raise UserError(
            f"'{name}' ({config.model_type}) cannot be loaded for sequence classification: {first_line(exc)}"
        ) from exc
    except load_errors() as exc:
        raise UserError(f"cannot load the weights of '{name}': {first_line(exc)}") from exc
    return model


__all__ = [
    "check_hub_name",
    "check_weight_files",
    "first_line",
    "hub_offline",
    "in_hub_cache",
    "load_causal_lm",
    "load_classifier",
    "load_errors",
    "looks_like_path",
    "model_source",
]
