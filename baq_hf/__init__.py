"""baq_hf: BAQ (Bit Allocation Quantization) for Hugging Face transformers.

Importing the package registers the "baq" quantization method with transformers, so that
``AutoModelForCausalLM.from_pretrained(..., quantization_config=BaqConfig(...))`` quantizes a model and
``from_pretrained`` of a saved BAQ checkpoint rebuilds it.

The core (``baq_hf.format``, ``allocation``, ``clipping``, ``gptq``, ``linear``, ``kernels``) does not
need transformers, and importing it does not load transformers: a serving engine or a script that only
reads packed weights pays for torch alone. So the registration is made as soon as transformers is
imported: at once if it already is, else by an import hook that runs it right after ``import
transformers`` completes. The top-level names (``BaqConfig``, ``BaqLinear``, ...) are loaded on first use.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
from typing import Any

__all__ = ["BaqConfig", "BaqHfQuantizer", "BaqLinear", "models", "register", "set_cpu_compute_dtype"]
__version__ = "0.1.0"

_LAZY = {
    "BaqConfig": "config",
    "BaqHfQuantizer": "quantizer",
    "BaqLinear": "linear",
    "models": "models",
    "set_cpu_compute_dtype": "linear",
}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'baq_hf' has no attribute {name!r}")
    module = importlib.import_module(f".{_LAZY[name]}", __name__)
    value = module if name == "models" else getattr(module, name)
    globals()[name] = value
    return value


def register() -> None:
    """Register the "baq" quantization method and config with transformers (idempotent).

    When transformers is first imported by ``baq_hf.config`` itself, the config class does not exist
    yet: config.py then calls this again at its end.
    """
    config = importlib.import_module(".config", __name__)
    if not hasattr(config, "BaqConfig"):
        return
    importlib.import_module(".quantizer", __name__)  # its decorator registers BaqHfQuantizer
    from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, register_quantization_config

    if "baq" not in AUTO_QUANTIZATION_CONFIG_MAPPING:
        register_quantization_config("baq")(config.BaqConfig)


class _RegisterAfterImport(importlib.abc.MetaPathFinder):
    """Finds ``transformers`` once, through the other finders, and runs :func:`register` when it is loaded."""

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        if fullname != "transformers":
            return None
        sys.meta_path.remove(self)
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is not None and spec.loader is not None:
            spec.loader = _RegisteringLoader(spec.loader)
        return spec


class _RegisteringLoader(importlib.abc.Loader):
    """transformers' own loader, then :func:`register`; the module keeps the original loader."""

    def __init__(self, loader: importlib.abc.Loader):
        self.loader = loader

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> Any:
        return self.loader.create_module(spec)

    def exec_module(self, module: Any) -> None:
        module.__loader__ = module.__spec__.loader = self.loader
        self.loader.exec_module(module)
        register()


if "transformers" in sys.modules:
    register()
elif not any(isinstance(f, _RegisterAfterImport) for f in sys.meta_path):
    sys.meta_path.insert(0, _RegisterAfterImport())
