"""Heterogeneous placement (work in progress: registers nothing yet)."""
