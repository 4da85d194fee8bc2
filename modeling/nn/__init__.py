"""almak's layers (QuantLinear, Sparse24Linear, Sparse24QuantLinear) and the surgery that swaps them into a model."""
