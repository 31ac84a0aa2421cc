"""Converted ports: PaConvert drafts a port from the reference's own source (paconvert.py),
align's rules make the draft runnable (rewrite.py) against a Paddle stand-in for the source
package's infrastructure (hf_runtime/), and port.py writes, loads and reports the result."""

from align.convert.port import convert, load_port, render

__all__ = ["convert", "load_port", "render"]
