"""Metamer generators: ``generate`` and its result type."""
from .generator import KINDS, Options, generate
from .result import MetamerResult

__all__ = ["generate", "MetamerResult", "Options", "KINDS"]
