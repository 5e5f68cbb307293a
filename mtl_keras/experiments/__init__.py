"""Experiments over the library: provenance of results, method comparisons, benchmark reports."""
