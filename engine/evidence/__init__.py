"""Class evidence: where in an image the evidence for a class lies, and whether the model uses it.

* :func:`evidence_maps` (``maps.py``): Grad-CAM, occlusion, integrated gradients, saliency and
  guided backprop maps for a batch and a class (default: the predicted one);
* ``metrics.py``: the causal check (Kim & Canny's causal filtering: mask each blob of the map's
  top region, keep those whose removal lowers the class probability), deletion / insertion
  curves with their AUC (RISE) and Average Drop / Increase (Grad-CAM++);
* ``run.py``: the cached job over an image set (:class:`EvidenceParams`, :class:`EvidenceResult`,
  :func:`run`, :func:`save_result`, :func:`load_result`).
"""

from .maps import METHOD_TITLES, METHODS, EvidenceError, EvidenceMaps, evidence_maps
from .metrics import Blobs, CausalCheck, Curves, DropIncrease, average_drop_increase, causal_check, deletion_insertion, find_blobs
from .run import CACHE_KIND, FORMAT_VERSION, EvidenceParams, EvidenceResult, load_result, run, save_result

__all__ = [
    "CACHE_KIND", "FORMAT_VERSION", "METHODS", "METHOD_TITLES", "Blobs", "CausalCheck", "Curves", "DropIncrease",
    "EvidenceError", "EvidenceMaps", "EvidenceParams", "EvidenceResult", "average_drop_increase", "causal_check",
    "deletion_insertion", "evidence_maps", "find_blobs", "load_result", "run", "save_result",
]
