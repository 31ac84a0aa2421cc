"""The references' builders and input recipes, one file per family (text.py, audio.py, ...).

The reference's model code always comes from its installed package (transformers, auraloss,
dac, ...); these files only say how to build it for an alignment and how to feed it.
"""
