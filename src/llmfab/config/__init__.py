"""Typed configuration: stage configs, model shapes, family recipes."""
