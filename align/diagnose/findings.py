"""Findings: what is wrong without being a numeric mismatch of one module, such as a paired
tensor kept in another dtype (a bf16 RoPE table where the reference keeps fp32)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Finding:
    """Something wrong that is not a numeric mismatch of one module."""

    kind: str  # "dtype_mismatch", "observer_effect", "unpaired", ...
    name: str
    message: str
    fails: bool  # whether it fails the gate on its own

    def to_dict(self) -> dict:
        return asdict(self)


def dtype_table(ref_dtypes: dict[str, str], port_dtypes: dict[str, str],
                to_port: Callable[[str], str | None]) -> tuple[dict[str, dict], list[Finding]]:
    """Every reference parameter and buffer with its dtype and its port counterpart's."""
    table, findings = {}, []
    for key, ref_dtype in ref_dtypes.items():
        port_key = to_port(key)
        port_dtype = port_dtypes.get(port_key) if port_key else None
        table[key] = {"reference": ref_dtype, "port_name": port_key, "port": port_dtype}
        if port_dtype is not None and port_dtype != ref_dtype:
            findings.append(Finding("dtype_mismatch", key,
                                    f"{key}: the reference keeps {ref_dtype}, the port's {port_key} is {port_dtype}",
                                    fails=True))
    return table, findings
