"""Step 2, build: the reference (torch), the port (paddle) and the seeded inputs, from a ModelSpec.

models.py builds modules (seeded, or as skeletons with no weights); inputs.py makes the
framework-free inputs from the model's recipe; backward.py says what backward starts from.
"""

from align.build.inputs import make_inputs
from align.build.models import (
                                build_port,
                                build_port_from,
                                build_reference,
                                config_values,
                                import_object,
                                load_port_pretrained,
                                port_skeleton,
                                port_slots,
                                reference_config,
                                reference_shapes,
                                reference_skeleton,
)

__all__ = ["build_port", "build_port_from", "build_reference", "config_values", "import_object",
           "load_port_pretrained", "make_inputs", "port_skeleton", "port_slots", "reference_config",
           "reference_shapes", "reference_skeleton"]
