"""The execution core: the steps above, scheduled three ways.

- in memory (`align run`): reference.py records the reference once, port.py judges the port
  against that record;
- block by block (`--stream-layers`, streamed.py): the same record and judgement, one block
  at a time, for models larger than memory (spill.py keeps large gradients on disk);
- across processes (`align trace` / `align check`): the record written to disk by
  trace_io.py and judged in another process, or another environment (across.py).

judged.py holds what every schedule shares: turning forced passes into results and a Report.
"""

from align.core.port import align_model, check_port
from align.core.reference import ReferenceRun, run_reference

__all__ = ["ReferenceRun", "align_model", "check_port", "run_reference"]
