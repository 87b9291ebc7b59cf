"""``fastmetamer.metrics``: distances and scores for metamers (SPEC §4).

A stable public namespace over :mod:`fastmetamer.analysis`; see there for definitions.
"""
from .analysis import *  # noqa: F401,F403
from .analysis import __all__  # noqa: F401
