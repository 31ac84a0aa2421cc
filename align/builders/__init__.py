"""Step 2, build: the reference (torch), the port (paddle) and the seeded inputs, from a ModelSpec.
(Named builders, not build: a directory named build is, by convention, generated output.)

models.py builds modules (seeded, or as skeletons with no weights); inputs.py makes the
framework-free inputs from the model's recipe; backward.py says what backward starts from.
"""

from align.builders.inputs import feed, make_inputs
from align.builders.models import (
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
                                   values_of,
)

__all__ = ["build_port", "build_port_from", "build_reference", "config_values", "feed", "import_object",
           "load_port_pretrained", "make_inputs", "port_skeleton", "port_slots", "reference_config",
           "reference_shapes", "reference_skeleton", "values_of"]
