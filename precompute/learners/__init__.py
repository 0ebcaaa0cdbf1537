"""Concept learners (torch, CPU or CUDA): ``LEARNERS`` maps a ``--method`` name to its class."""
from .attribution import AttributionNMF
from .directions import DirectionPairs
from .face import FACE
from .nmf import NMF
from .seminmf import SemiNMF

LEARNERS = {"nmf": NMF, "face": FACE, "attribution": AttributionNMF, "directions": DirectionPairs,
            "seminmf": SemiNMF}

__all__ = ["LEARNERS", "NMF", "FACE", "AttributionNMF", "DirectionPairs", "SemiNMF"]
