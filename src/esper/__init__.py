"""Esper-Lite: a control plane for morphogenetic training."""

__version__ = "0.1.0"
