"""What every checkpoint format shares: the folder's config, the int32 row packing, the safetensors tensors of
a folder by name, and the helpers that build almak's layers from stored tensors."""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
import torch.nn as nn

from almak.errors import AlmakError
from almak.modeling.nn.quant_linear import QuantLinear
from almak.modeling.nn.sparse_linear import Sparse24Linear, Sparse24QuantLinear


def pack_rows(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack unsigned ``bits``-bit values (R, C) into (R, ceil(C * bits / 32)) int32, lowest bits first.

    >>> pack_rows(torch.tensor([[1, 2, 3, 4]]), 8)
    tensor([[67305985]], dtype=torch.int32)
    """
    per = 32 // bits
    v = values.to(torch.int64)
    R, C = v.shape
    if (-C) % per:
        v = torch.nn.functional.pad(v, (0, (-C) % per))
    shifts = torch.arange(0, 32, bits, device=v.device, dtype=torch.int64)
    words = (v.reshape(R, -1, per) << shifts).sum(-1)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def unpack_rows(words: torch.Tensor, bits: int, cols: int) -> torch.Tensor:
    """Inverse of :func:`pack_rows`: (R, W) int32 -> (R, cols) int64 unsigned values."""
    shifts = torch.arange(0, 32, bits, device=words.device, dtype=torch.int64)
    u = ((words.to(torch.int64) & 0xFFFFFFFF).unsqueeze(-1) >> shifts) & (2**bits - 1)
    return u.reshape(words.shape[0], -1)[:, :cols]


def read_config(folder: Path) -> dict:
    path = folder / "config.json"
    if not path.is_file():
        raise AlmakError(f"{folder} has no config.json: not a model folder")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise AlmakError(f"{path} is not valid JSON: {e}") from None


# Files that hold a tokenizer (any one is enough for AutoTokenizer).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files a model folder's weights are in (its shard index's, or every ``*.safetensors``), each
    checked to exist; an AlmakError for a folder of pickle files only (almak never unpickles: it can run code)."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError, UnicodeDecodeError):
            raise AlmakError(f"{index} is not a shard index (JSON with a weight_map)") from None
        missing = [n for n in names if not (folder / n).is_file()]
        if missing:
            raise AlmakError(f"{folder}: its shard index names {missing[0]}, which is not in the folder"
                             + (f" ({len(missing)} shards missing)" if len(missing) > 1 else "")
                             + "; the download is incomplete")
        return [folder / n for n in names]
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        pickled = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if pickled:
            raise AlmakError(f"{folder} holds only pickle weights ({', '.join(pickled[:3])}); almak loads "
                             "safetensors only, since unpickling can run code: convert them (transformers' "
                             "save_pretrained writes safetensors) or use the model's safetensors release")
        raise AlmakError(f"{folder} holds no model weights (*.safetensors)")
    return files


def check_model_folder(folder: Path) -> dict:
    """Refuse, with one line naming the problem, a model folder that would fail half-way through loading: a
    config.json that is not JSON or names no model type transformers knows, missing or unreadable safetensors
    files (corrupt, truncated, a shard index naming a missing shard), pickle weights only, no tokenizer. Reads only
    headers. Returns the config."""
    from safetensors import SafetensorError, safe_open
    from transformers import CONFIG_MAPPING, __version__

    folder = Path(folder)
    config = read_config(folder)
    if not isinstance(config, dict):
        raise AlmakError(f"{folder / 'config.json'} is not a model config (a JSON object)")
    kind = config.get("model_type")
    if not kind:
        raise AlmakError(f"{folder / 'config.json'} names no model_type")
    if kind not in CONFIG_MAPPING:
        raise AlmakError(f"{folder}: model_type {kind!r} is not a model transformers {__version__} knows; almak "
                         "runs LLaMA-family models (llama, mistral), and other causal LMs with --engine hf")
    for path in weight_files(folder):
        try:
            with safe_open(str(path), framework="pt"):
                pass
        except (SafetensorError, OSError) as e:
            raise AlmakError(f"{path} is not a readable safetensors file ({str(e).splitlines()[0]}): the download "
                             "is incomplete or the file is corrupt") from None
    if not any((folder / f).is_file() for f in TOKENIZER_FILES):
        raise AlmakError(f"{folder} holds no tokenizer ({', '.join(TOKENIZER_FILES)}); copy the base model's "
                         "tokenizer files into it")
    return config


def quant_config(folder: Path) -> dict:
    """``quantization_config`` of config.json, or AutoGPTQ's ``quantize_config.json``, or {}."""
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        return {}
    qc = read_config(folder).get("quantization_config") or {}
    autogptq = folder / "quantize_config.json"
    if autogptq.is_file() and qc.get("quant_method", "gptq") == "gptq":
        # AutoGPTQ's own file; GPTQModel keeps e.g. checkpoint_format there. config.json wins where both say.
        qc = {"quant_method": "gptq", **json.loads(autogptq.read_text(encoding="utf-8")), **qc}
    return qc


def quant_layers(model: nn.Module) -> dict[str, QuantLinear | Sparse24QuantLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, (QuantLinear, Sparse24QuantLinear))}


def sparse_layers(model: nn.Module) -> dict[str, Sparse24Linear | Sparse24QuantLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, (Sparse24Linear, Sparse24QuantLinear))}


def scheme_key(layer: QuantLinear) -> tuple:
    return (layer.bits, layer.group_size, layer.sym)


class Tensors:
    """Lazy access to the tensors of a folder's safetensors file(s), by name."""

    def __init__(self, folder: Path):
        from safetensors import safe_open

        self.handles = [safe_open(str(f), framework="pt") for f in weight_files(folder)]
        self.where = {k: h for h in self.handles for k in h.keys()}  # noqa: SIM118 (a safe_open handle)

    def __contains__(self, key: str) -> bool:
        return key in self.where

    def __iter__(self):
        return iter(self.where)

    def get(self, key: str) -> torch.Tensor:
        return self.where[key].get_tensor(key)


def linear_at(model: nn.Module, name: str, folder: Path) -> nn.Linear:
    try:
        module = model.get_submodule(name)
    except AttributeError:
        raise AlmakError(f"{folder}: quantized tensors for {name}, which the model has no module for") from None
    if not isinstance(module, nn.Linear):
        raise AlmakError(f"{folder}: {name} is a {type(module).__name__}, not a Linear, yet has quantized tensors")
    return module


def new_quant_linear(folder: Path, name: str, linear: nn.Linear, bits: int, group_size: int, sym: bool,
                      bias: bool, dtype: torch.dtype) -> QuantLinear:
    try:
        return QuantLinear(linear.in_features, linear.out_features, bits, group_size, sym, bias, dtype=dtype,
                           device="meta")
    except ValueError as e:
        raise AlmakError(f"{folder}: {name} cannot be loaded by almak: {e}") from None


def fill_layer(layer: QuantLinear, packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None,
          bias: torch.Tensor | None, perm: torch.Tensor | None = None) -> None:
    layer.weight_packed = packed.contiguous()
    layer.weight_scale = scale.contiguous()
    if zero is not None:
        layer.weight_zero_point = zero.to(scale.dtype).contiguous()
    if bias is not None:
        layer.bias = bias.contiguous()
    layer.set_input_perm(perm)  # also drops the CPU-side cache


def matches(name: str, target: str) -> bool:
    """compressed-tensors' rule: ``re:`` regex (re.match), an exact name, or the class name Linear."""
    if target.startswith("re:"):
        return re.match(target[3:], name) is not None
    return target in (name, "Linear")


def group_order(g_idx: torch.Tensor, K: int, group_size: int, who: str) -> torch.Tensor | None:
    """None for a ``g_idx`` (group of each input column) that is ``arange(K) // group_size``; else the column
    order (stable sort by group) that makes every group a run of ``group_size`` stored columns, which is how
    act-order with non-static groups (GPTQ ``desc_act``, compressed-tensors ``actorder: group``) lays them out."""
    g_idx = g_idx.to(torch.int64).flatten()
    G = K if group_size == -1 else group_size
    trivial = torch.arange(K, dtype=torch.int64) // G
    if g_idx.shape != (K,):
        raise AlmakError(f"{who}: g_idx has {g_idx.numel()} entries for {K} input columns")
    if torch.equal(g_idx, trivial):
        return None
    perm = torch.sort(g_idx, stable=True).indices
    if not torch.equal(g_idx[perm], trivial):
        raise AlmakError(f"{who}: g_idx does not give every group {G} columns; almak reads g_idx that permute "
                         "whole groups of columns (act-order)")
    return perm
