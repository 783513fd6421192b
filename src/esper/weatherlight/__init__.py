"""Weatherlight: the service that composes and supervises Esper-Lite's workers."""
