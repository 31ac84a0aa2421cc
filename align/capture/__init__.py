"""Step 4, capture: where torch and paddle meet. Hooks record a model's run into a Trace
(numpy only); forcing replays the port on a reference Trace, one boundary at a time.

trace.py is the data (Arr, Call, Trace); structure.py walks nested inputs and outputs;
hooks.py installs hooks inside a `with` and records; force.py (teacher forcing) and
follow.py (free running) drive the port and show each comparison to a Judge;
torch_side.py and paddle_side.py are the two framework adapters (imported on demand).
"""

from align.capture.hooks import Recorder, hooked, run_and_record
from align.capture.structure import (
           flatten,
           map_inputs,
           map_tensors,
           named_inputs,
           positional_names,
)
from align.capture.trace import BACKWARD, FORWARD, ROOT, Arr, Call, Opaque, Trace

__all__ = ["BACKWARD", "FORWARD", "ROOT", "Arr", "Call", "Opaque", "Recorder", "Trace", "flatten", "hooked",
           "map_inputs", "map_tensors", "named_inputs", "positional_names", "run_and_record"]
