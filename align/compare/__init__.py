"""Step 5, compare: pair reference and port by name, measure each pair, judge it. numpy only.

metrics.py holds the pure error functions; pair.py the name pairing; judges.py the Judges
that compare as the port runs (Collector) or keep what they see (Keeper, keep.py);
results.py the frozen results (LayerResult, TensorResult, RunResult) and tolerances.
"""

from align.compare.judges import Collector, Keeper, truth_key
from align.compare.metrics import Metrics, compare_arrays, missing, rel_l2, within_noise
from align.compare.pair import Pair, Pairing, Unpaired, pair_calls
from align.compare.results import (
                                   FREE_RUNNING,
                                   TEACHER_FORCED,
                                   Amplification,
                                   Culprits,
                                   Divergence,
                                   LayerResult,
                                   RunResult,
                                   TensorResult,
                                   Tolerances,
)

__all__ = ["FREE_RUNNING", "TEACHER_FORCED", "Amplification", "Collector", "Culprits", "Divergence", "Keeper",
           "LayerResult", "Metrics", "Pair", "Pairing", "RunResult", "TensorResult", "Tolerances", "Unpaired",
           "compare_arrays", "missing", "pair_calls", "rel_l2", "truth_key", "within_noise"]
