"""The layer update: Cholesky solver and the spread of residuals over layers."""
