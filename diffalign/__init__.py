"""diffalign: preference alignment for diffusion models (Diffusion-DPO and its successors)."""

__version__ = "0.1.0"
