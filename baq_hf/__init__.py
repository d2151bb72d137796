"""baq_hf: BAQ (Bit Allocation Quantization) for Hugging Face transformers."""

__version__ = "0.1.0"
