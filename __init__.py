"""mmdit: disaggregated-data Megatron training for Qwen-Image-class MMDiT models."""

__version__ = "0.1.0"
