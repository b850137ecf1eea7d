"""megaslm: pretraining with Selective Language Modeling (Rho-1) on DeepSpeed."""

__version__ = "0.1.0"
