"""One prediction as the JSON object the command line (``gpunet predict --json``) and the server
(``gpunet serve``'s ``POST /predict``) both answer with, written once so that both say the same."""

from __future__ import annotations

import numpy as np

DIGITS = 6  # probabilities are rounded to 6 decimals: float32 holds about 7 significant digits


def prediction(probabilities, warnings=(), top: int = 3, key: str = "digit", classes=None) -> dict:
    """One row of class probabilities (C,) -> ``{"digit", "top3", "probabilities", "warnings"}``.

    ``digit`` is the most probable class (the first one on a tie, as ``argmax``), ``top3`` the
    ``top`` most probable classes, most probable first, each ``{"digit", "probability"}``;
    ``probabilities`` the C probabilities as floats; ``warnings`` a list of sentences about the
    input. A table's model names its answer ``key="class"``, each class by its name in ``classes``
    (its index when None).
    """
    p = np.asarray(probabilities, dtype=np.float64).reshape(-1)
    order = np.argsort(-p, kind="stable")[:top]
    name = (lambda k: int(k)) if classes is None else (lambda k: classes[int(k)])
    return {
        key: name(order[0]),
        "top3": [{key: name(k), "probability": round(float(p[k]), DIGITS)} for k in order],
        "probabilities": [round(float(v), DIGITS) for v in p],
        "warnings": list(warnings),
    }
