"""Hand-written Paddle ports, one folder per family (text/, audio/, vision/, ...), one file per
model; each mirrors its reference's module names. common.py holds the torch semantics that
Paddle spells differently, shared by every family."""
