"""Geometry representations: grid encodings and neural fields."""
