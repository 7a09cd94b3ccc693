"""Where models logged before the served model had its own layer find their class.

Every logged model runs its own copy of `pyfunc_entry.py`; those logged from the layered
layout until `skinml.inference` say `from skinml.tracking.pyfunc import SkinLesionModel`.
The class lives in `skinml.inference.pyfunc` now; this name keeps those models loading
(tests/tracking/test_legacy_model.py). Nothing in skinml imports this module.
"""

from skinml.inference.pyfunc import SkinLesionModel

__all__ = ["SkinLesionModel"]
