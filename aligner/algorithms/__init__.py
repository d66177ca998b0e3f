"""aligner.algorithms: one module per algorithm on a shared core and losses/ (docs/architecture.md)."""
