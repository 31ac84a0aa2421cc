"""Hand-written Paddle ports of parameter-less audio losses; each mirrors its reference's module names."""
