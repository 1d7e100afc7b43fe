"""Losses, written to read like their formulas (see ../shared/DESIGN.md)."""
