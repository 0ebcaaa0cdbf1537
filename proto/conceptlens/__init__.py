"""conceptlens: concept explanations for image classifiers, served online.

Subpackages: ``service`` (explain core, runtimes, gRPC server), ``precompute`` (the offline job),
``handlers`` (TorchServe), ``v1`` (generated gRPC code).
"""
__version__ = "0.1.0"
