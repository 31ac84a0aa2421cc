"""Torch's type promotion for the mixed-dtype arithmetic HF code relies on.

Torch promotes `int64 * float32` to float32 and `float32 * bool` to float32. Paddle 3.3.1
raises instead ("Type promotion only support calculations between floating-point numbers
..."). The runtime's own code (masks, pooling, losses) goes through `promote` wherever an
integer or boolean tensor meets a floating one, so it computes what torch computes.
"""

from __future__ import annotations

import paddle

# Torch's categories: bool < integer < floating. Within a category the wider type wins; across
# categories the higher category's type wins (a float32 stays float32 next to an int64).
_CATEGORY = {"bool": 0, "uint8": 1, "int8": 1, "int16": 1, "int32": 1, "int64": 1,
             "float16": 2, "bfloat16": 2, "float32": 2, "float64": 2}
_WIDTH = {"bool": 1, "uint8": 8, "int8": 8, "int16": 16, "int32": 32, "int64": 64,
          "float16": 16, "bfloat16": 16, "float32": 32, "float64": 64}


def dtype_name(t: paddle.Tensor) -> str:
    return str(t.dtype).replace("paddle.", "")


def result_type(a: paddle.Tensor, b: paddle.Tensor) -> str:
    """The dtype torch gives `a op b` for two tensors of the same rank category (no scalars)."""
    da, db = dtype_name(a), dtype_name(b)
    ca, cb = _CATEGORY[da], _CATEGORY[db]
    if ca != cb:
        return da if ca > cb else db
    if {da, db} == {"float16", "bfloat16"}:
        return "float32"
    return da if _WIDTH[da] >= _WIDTH[db] else db


def promote(a: paddle.Tensor, b: paddle.Tensor) -> tuple[paddle.Tensor, paddle.Tensor]:
    """Both tensors cast to torch's result type, ready for a Paddle binary op."""
    target = result_type(a, b)
    return (a if dtype_name(a) == target else a.astype(target),
            b if dtype_name(b) == target else b.astype(target))


def mul(a: paddle.Tensor, b: paddle.Tensor) -> paddle.Tensor:
    """`a * b` with torch's promotion."""
    a, b = promote(a, b)
    return a * b
