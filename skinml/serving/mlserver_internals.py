"""The one place skinml reads mlserver_mlflow's internals: the pyfunc its `MLflowRuntime`
loaded (`_model`) and the input schema it read from the model's signature
(`_input_schema`); mlserver_mlflow offers no public way to reach either.

pyproject pins mlserver-mlflow to the minor release these were read from
(`INTERNALS_OF`); `missing_internals()` lists what the installed one no longer sets, and
the suite fails on it (tests/serving/test_mlserver_runtime.py).
"""

from __future__ import annotations

import inspect
from typing import Any

from mlflow.pyfunc import PyFuncModel
from mlserver_mlflow import MLflowRuntime

INTERNALS_OF = "1.7"  # the mlserver-mlflow minor release this module was written against
_ATTRIBUTES = ("_model", "_input_schema")


def loaded_pyfunc(runtime: MLflowRuntime) -> PyFuncModel:
    """The MLflow pyfunc the runtime loaded (its `load()` sets it)."""
    return runtime._model


def input_schema(runtime: MLflowRuntime) -> Any:
    """The model signature's input schema, as the runtime read it."""
    return runtime._input_schema


def missing_internals() -> list[str]:
    """What `loaded_pyfunc` and `input_schema` rely on that the installed runtime lacks."""
    source = inspect.getsource(MLflowRuntime.load)
    return [f"MLflowRuntime.load sets self.{name}" for name in _ATTRIBUTES
            if f"self.{name} =" not in source]
