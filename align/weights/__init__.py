"""Step 3, weights: declarative rules map the reference's state dict onto the port's, and back.

rules.py reads weights/<model>.toml; plan.py decides every tensor's transform from names and
layer types and proves loads bit-exact; loader.py puts weights into models (whole, or a
subtree at a time for streaming); checkpoint.py and safetensors_io.py read and write files.
"""

from align.weights.plan import (
                                PortSlot,
                                WeightEntry,
                                WeightMap,
                                build_sources,
                                build_targets,
                                convert,
                                describe_slots,
                                merge_parts,
                                plan,
                                render_rules,
                                same_bytes,
                                split_parts,
                                verify,
)
from align.weights.rules import Fuse, Rename, Rules, load_rules

__all__ = ["Fuse", "PortSlot", "Rename", "Rules", "WeightEntry", "WeightMap", "build_sources", "build_targets", "convert",
           "describe_slots", "load_rules", "merge_parts", "plan", "render_rules", "same_bytes", "split_parts", "verify"]
