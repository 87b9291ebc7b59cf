"""The invariance study (SPEC §6): datasets x architectures x mitigations x matched layers, with
depth and width sweeps, node and graph classification, in one resumable run.

>>> from fastmetamer.study import run_study
>>> report = run_study("study-out", quick=True)     # study.md, study.csv, figures/*.png
"""
from .config import ARCHITECTURES, MITIGATIONS, StudyConfig, full_config, mitigation_names, quick_config
from .runner import run_config, run_study

__all__ = ["run_study", "run_config", "StudyConfig", "quick_config", "full_config", "mitigation_names",
           "ARCHITECTURES", "MITIGATIONS"]
