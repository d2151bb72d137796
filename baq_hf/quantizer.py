"""BaqHfQuantizer: the transformers integration (registered as quant_method "baq" on import)."""

from __future__ import annotations

import logging
import os
import types
from typing import Any

import torch
from torch import nn
from transformers.quantizers import HfQuantizer
from transformers.quantizers.auto import register_quantizer

from . import format as fmt
from .checkpoint import (
    check_complete_folder,
    round_unquantized,
    storage_state_dict,
    unquantized_storage_dtype,
)
from .config import BaqConfig
from .filemode import fix_safetensors_modes
from .linear import BaqLinear, prepare_kernel_layouts

logger = logging.getLogger(__name__)


def read_checkpoint_layout(checkpoint_files: list[str] | None) -> dict[str, dict[str, fmt.TensorInfo]]:
    """Every packed layer of the checkpoint and its tensors' shapes and dtypes, from safetensors headers."""
    if not checkpoint_files:
        raise ValueError("a BAQ-quantized checkpoint must be stored as safetensors files; none were found")
    tensors: dict[str, fmt.TensorInfo] = {}
    for path in checkpoint_files:
        if not str(path).endswith(".safetensors"):
            raise ValueError(f"{path} is not a safetensors file; baq_hf loads only safetensors checkpoints")
        check_complete_folder(os.path.dirname(path))
        tensors.update(fmt.read_safetensors_header(path))
    return fmt.packed_layers(tensors)


def save_pretrained(self: nn.Module, save_directory: str | os.PathLike, *args: Any, **kwargs: Any) -> Any:
    """The model class's ``save_pretrained``, then its safetensors files made readable like the rest.

    Bound to each BAQ model (the instance, not the class: transformers is left as it is) because
    safetensors >= 0.8 writes them 0600 (see :mod:`baq_hf.filemode`). Named like the method so that a
    pickled model (which pickles a bound method as getattr(model, its name)) loads again.
    """
    out = type(self).save_pretrained(self, save_directory, *args, **kwargs)
    if os.path.isdir(save_directory):
        fix_safetensors_modes(save_directory)
    return out


def _module_for_key(model: nn.Module, key: str) -> tuple[str, nn.Module] | None:
    """Map a checkpoint module name to the model's module (handles a base-model prefix difference)."""
    modules = dict(model.named_modules())
    prefix = getattr(model, "base_model_prefix", "")
    for candidate in (key, key.removeprefix(prefix + "."), f"{prefix}.{key}"):
        if candidate in modules:
            return candidate, modules[candidate]
    return None


def build_baq_modules(model: nn.Module, layout: dict[str, dict[str, fmt.TensorInfo]]) -> int:
    """Replace the checkpoint's quantized layers with empty BaqLinear of the exact stored shapes.

    The bias keeps the checkpoint's dtype, like the other stored tensors, so a reloaded layer holds
    (and counts in its effective bits) exactly what was saved.
    """
    from . import calibration  # not at the top: registering the quantizer must not need the driver

    for key, tensors in layout.items():
        found = _module_for_key(model, key)
        if found is None:
            raise ValueError(f"the checkpoint quantizes {key!r}, which this model does not have")
        name, module = found
        if not isinstance(module, calibration.QUANTIZABLE):
            raise ValueError(
                f"the checkpoint quantizes {key!r}, a {type(module).__name__}, not a Linear layer"
            )
        n_out, n_in = module.weight.shape if isinstance(module, nn.Linear) else module.weight.shape[::-1]
        expected = fmt.ModuleShape(n_out, n_in, getattr(module, "bias", None) is not None)
        shapes = {tensor: info.shape for tensor, info in tensors.items()}
        shape = fmt.WeightShape.from_shapes(shapes, key, expected)
        for spec in shape.specs():  # transformers would cast a float tensor to the buffer's int dtype
            if (wrong := spec.dtype_error(tensors[spec.name].torch_dtype)) is not None:
                raise ValueError(f"corrupt BAQ checkpoint: layer {key!r}: {wrong}")
        bias_dtype = tensors[fmt.BIAS].torch_dtype if fmt.BIAS in tensors else torch.float32
        model.set_submodule(name, BaqLinear.from_shape(shape, bias_dtype, device="meta"))
    return len(layout)


@register_quantizer("baq")
class BaqHfQuantizer(HfQuantizer):
    """Quantizes a float checkpoint with GPTQ+BAQ after loading, or rebuilds a saved BAQ checkpoint."""

    requires_calibration = False
    quantization_config: BaqConfig

    def __init__(self, quantization_config: BaqConfig, **kwargs: Any):
        super().__init__(quantization_config, **kwargs)
        self.report: dict | None = None

    def validate_environment(self, *args: Any, **kwargs: Any) -> None:
        device_map = kwargs.get("device_map")
        if not self.pre_quantized and isinstance(device_map, dict) and len(set(device_map.values())) > 1:
            raise ValueError(
                "quantizing needs the model on one device (blocks move to the GPU one at a time anyway); "
                "load without device_map to quantize, save, then reload the quantized model with device_map"
            )

    def _process_model_before_weight_loading(self, model, checkpoint_files=None, dtype=None, **kwargs):
        if self.pre_quantized:
            n = build_baq_modules(model, read_checkpoint_layout(checkpoint_files))
            logger.info("rebuilt %d BaqLinear layers from the checkpoint", n)
        return model

    def _process_model_after_weight_loading(self, model, **kwargs):
        model.save_pretrained = types.MethodType(save_pretrained, model)
        if self.pre_quantized:
            for name, module in model.named_modules():
                if isinstance(module, BaqLinear):
                    module.validate(name)
            prepare_kernel_layouts(model)  # the layouts of the layers loaded onto a GPU, built there now
            return model
        from . import calibration
        from .data import calibration_and_heldout
        from .sanity import SANITY_SEQLEN, SANITY_WINDOWS, heldout_nll, sanity_report

        config = self.quantization_config
        tokenizer = config.tokenizer
        if isinstance(tokenizer, str) or (tokenizer is None and not _is_token_ids(config.dataset)):
            from transformers import AutoTokenizer

            source = tokenizer or model.name_or_path
            try:
                tokenizer = AutoTokenizer.from_pretrained(source)
            except Exception as exc:
                raise ValueError(
                    f"BaqConfig.tokenizer is needed to tokenize text calibration data and none could be "
                    f"loaded from {source!r} ({exc}); pass tokenizer=... or token ids as dataset"
                ) from exc
        windows, heldout = calibration_and_heldout(
            config.dataset,
            tokenizer,
            config.num_samples,
            config.seqlen,
            config.seed,
            SANITY_WINDOWS,
            min(config.seqlen, SANITY_SEQLEN),
        )
        max_pos = getattr(model.config.get_text_config(), "max_position_embeddings", None)
        if max_pos is not None and config.seqlen > max_pos:
            raise ValueError(
                f"BaqConfig.seqlen={config.seqlen} exceeds the model's max_position_embeddings={max_pos}; "
                f"use seqlen <= {max_pos}"
            )
        nll_before = heldout_nll(model, heldout, "float model")
        self.report = calibration.quantize_model(model, windows, config)
        nll_after = heldout_nll(model, heldout, "quantized model")
        self.report["sanity"] = sanity_report(nll_before, nll_after, heldout)
        model.baq_report = self.report
        storage = unquantized_storage_dtype(model.dtype, config.keep_float32)
        if storage is not None:
            round_unquantized(model, storage)
        return model

    def _dequantize(self, model, dtype=None):
        logger.warning(
            "dequantizing: every BaqLinear becomes a float nn.Linear; the model is no longer quantized"
        )
        if isinstance(dtype, str):  # transformers passes model.config.dtype, a name in some loading paths
            dtype = getattr(torch, dtype)
        for name, module in list(model.named_modules()):
            if isinstance(module, BaqLinear):
                target = dtype or (module.bias.dtype if module.bias is not None else torch.float32)
                has_bias = module.bias is not None
                dense = nn.Linear(
                    module.in_features,
                    module.out_features,
                    bias=has_bias,
                    device=module.weight.device,
                    dtype=target,
                )
                dense.weight.data.copy_(module.effective_weight(target))
                if has_bias:
                    dense.bias.data.copy_(module.bias)
                model.set_submodule(name, dense)
        return model

    @property
    def is_trainable(self) -> bool:
        """Adapters (LoRA through peft) train on a BAQ model; the packed codes stay frozen."""
        return True

    @property
    def is_qat_trainable(self) -> bool:
        return False

    def is_serializable(self, safe_serialization: bool | None = None) -> bool:
        return True

    def get_state_dict_and_metadata(self, model):
        """What ``save_pretrained`` writes: unquantized float tensors in 16 bits unless keep_float32."""
        storage = unquantized_storage_dtype(model.dtype, self.quantization_config.keep_float32)
        return (None if storage is None else storage_state_dict(model, storage)), {}

    @property
    def is_compileable(self) -> bool:
        return True


def _is_token_ids(dataset: Any) -> bool:
    if isinstance(dataset, torch.Tensor):
        return True
    return isinstance(dataset, (list, tuple)) and bool(dataset) and not isinstance(dataset[0], str)
