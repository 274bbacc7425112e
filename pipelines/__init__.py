"""poisonguard: screen a training dataset for poisoning before every training cycle."""

__version__ = "0.1.0"
