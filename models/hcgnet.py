"""HCGNet-A1/A2 (placeholder until written)."""
