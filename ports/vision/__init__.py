"""Hand-written Paddle ports of vision models, one module per model."""
