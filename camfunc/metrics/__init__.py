"""Faithfulness and localisation metrics for class activation maps.

Every metric is batched and takes the model as a callable ``x -> scores``
(a ``camfunc.Split`` is one). Names resolve lazily, so optional dependencies
(scipy for ROAD, captum for nothing: infidelity is written in torch) load
only when their metric is used.
"""

from __future__ import annotations

import importlib
from typing import Any

# public name -> private module that defines it
_PUBLIC: dict[str, str] = {
    "road": "._road",
    "road_curve": "._road",
    "road_impute": "._road",
    "arcc": "._arcc",
    "infidelity": "._sensitivity",
    "sensitivity_max": "._sensitivity",
    "ConfidenceChange": "._confidence",
    "confidence_change": "._confidence",
    "average_drop": "._confidence",
    "increase_in_confidence": "._confidence",
    "CausalCurve": "._curves",
    "deletion": "._curves",
    "insertion": "._curves",
    "PointingGame": "._pointing",
    "EnergyPointingGame": "._pointing",
    "pointing_game": "._pointing",
    "energy_pointing_game": "._pointing",
    "pointing_game_chance": "._pointing",
    "Randomisation": "._sanity",
    "model_randomisation": "._sanity",
    "spearman": "._sanity",
    "ssim": "._sanity",
}

__all__ = sorted(_PUBLIC)


def __getattr__(name: str) -> Any:
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module 'camfunc.metrics' has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_PUBLIC))
