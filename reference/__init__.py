"""Builders and input recipes for references that are not a plain transformers class.

The reference model code itself always comes from the installed package, never from here.
"""
