"""baq_hf: BAQ (Bit Allocation Quantization) for Hugging Face transformers.

Importing the package registers the "baq" quantization method with transformers, so that
``AutoModelForCausalLM.from_pretrained(..., quantization_config=BaqConfig(...))`` quantizes a model and
``from_pretrained`` of a saved BAQ checkpoint rebuilds it.
"""

from transformers.quantizers.auto import register_quantization_config

from . import models  # baq_hf.models.resolve_model("smollm2-135m"): the embedded demo model
from .config import BaqConfig
from .linear import BaqLinear
from .quantizer import BaqHfQuantizer

register_quantization_config("baq")(BaqConfig)

__all__ = ["BaqConfig", "BaqHfQuantizer", "BaqLinear", "models"]
__version__ = "0.1.0"
