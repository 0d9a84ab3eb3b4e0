"""Procedural toy worlds with exact programmatic judges (ShapesWorld)."""
