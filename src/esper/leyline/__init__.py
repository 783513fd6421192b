"""Leyline: the one schema every Esper-Lite subsystem speaks.

``leyline_pb2`` is generated from ``contracts/leyline/leyline.proto`` by
``scripts/generate_leyline.py``; subsystems import its messages and enums
directly instead of keeping parallel definitions.
"""

from esper.leyline import leyline_pb2

__all__ = ["leyline_pb2"]
