"""Hand-written Paddle ports, one package per model; each mirrors its reference's module names."""
