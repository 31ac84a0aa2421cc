"""RoPE initialisation. The modeling files compute the "default" type themselves
(`compute_default_rope_parameters`); ROPE_INIT_FUNCTIONS holds the other types, and
align's runtime has none of them: asking for one fails loudly instead of rotating wrongly."""

from __future__ import annotations

import functools


class _RopeFunctions(dict):
    def __getitem__(self, rope_type: str):
        raise NotImplementedError(f"RoPE type {rope_type!r} is not in align's runtime (only 'default')")


ROPE_INIT_FUNCTIONS = _RopeFunctions()


def dynamic_rope_update(forward):
    """HF recomputes inv_freq for "dynamic" and "longrope" RoPE; for every other type this
    decorator changes nothing. Those two types are refused."""

    @functools.wraps(forward)
    def wrapper(self, *args, **kwargs):
        types = self.rope_type.values() if isinstance(self.rope_type, dict) else [self.rope_type]
        if any(t in ("dynamic", "longrope") for t in types):
            raise NotImplementedError(f"RoPE type {self.rope_type!r} is not in align's runtime")
        return forward(self, *args, **kwargs)

    return wrapper
