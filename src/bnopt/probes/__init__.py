"""The paper's measurements: a library usable on any PyTorch model, and in-loop probes for training runs.

    from bnopt.probes import measure_ics, probe_landscape

Both are pure observations; see their docstrings and the README for the exact definitions.
"""

from bnopt.probes.activations import ActivationRecorder
from bnopt.probes.ics import ics_gradients, measure_ics
from bnopt.probes.landscape import probe_landscape
from bnopt.probes.loop import PROBES, ActivationProbe, ICSProbe, LandscapeProbe, Probe, build_probes
from bnopt.probes.observation import random_state

__all__ = [
    "measure_ics",
    "ics_gradients",
    "probe_landscape",
    "random_state",
    "ActivationRecorder",
    "Probe",
    "ICSProbe",
    "LandscapeProbe",
    "ActivationProbe",
    "PROBES",
    "build_probes",
]
