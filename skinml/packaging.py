"""Where models logged before skinml 0.2's layered layout find their class.

Every logged model runs its own copy of `pyfunc_entry.py`; the ones logged until then say
`from skinml.packaging import SkinLesionModel`. The class lives in `skinml.inference.pyfunc`
now; this name keeps those models loading (tests/tracking/test_legacy_model.py).
"""

from skinml.inference.pyfunc import SkinLesionModel

__all__ = ["SkinLesionModel"]
