"""Benchmarks import the PyG baseline from this folder."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
