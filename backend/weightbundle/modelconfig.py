"""Write a complete Triton ``config.pbtxt`` from a bundle's signature."""
from __future__ import annotations

from typing import Mapping

import numpy as np

from .control import CONTROL_INPUT, RESULT_OUTPUT, VERSION_OUTPUT
from .errors import BundleError
from .runtime import Bundle, TensorSpec

TRITON_TYPES = {
    "float16": "TYPE_FP16", "float32": "TYPE_FP32", "float64": "TYPE_FP64", "int8": "TYPE_INT8", "int16": "TYPE_INT16",
    "int32": "TYPE_INT32", "int64": "TYPE_INT64", "uint8": "TYPE_UINT8", "uint16": "TYPE_UINT16", "uint32": "TYPE_UINT32",
    "uint64": "TYPE_UINT64", "bool": "TYPE_BOOL", "object": "TYPE_STRING",
}


def _ttype(dtype: np.dtype) -> str:
    try:
        return TRITON_TYPES[np.dtype(dtype).name]
    except KeyError:
        raise BundleError(f"dtype {dtype} has no Triton equivalent") from None


def _dims(spec: TensorSpec, batching: bool) -> list[int]:
    if spec.shape is None:
        raise BundleError(f"tensor {spec.name!r} has unknown rank; Triton needs its dims")
    dims = [-1 if d is None else d for d in spec.shape]
    if batching:
        if not dims or dims[0] != -1:
            raise BundleError(f"tensor {spec.name!r} has no dynamic first dimension, so the model cannot batch; use --max-batch-size 0")
        dims = dims[1:]
    return dims or [1]


def _tensor(name: str, ttype: str, dims: list[int], optional: bool = False) -> str:
    opt = " optional: true" if optional else ""
    return f'  {{ name: "{name}" data_type: {ttype} dims: [ {", ".join(map(str, dims))} ]{opt} }}'


def make_config(bundle: Bundle, name: str, max_batch_size: int = 0, instances: int = 1, kind: str = "KIND_CPU",
                parameters: Mapping[str, str] | None = None) -> str:
    """config.pbtxt text: inference I/O, optional CONTROL and weight inputs, WEIGHTS_VERSION.

    Weight inputs get dims of -1 in every position (same rank as the variable), so an
    empty "keep" tensor of that rank passes Triton's checks; the backend checks exact
    shapes.  With batching, Triton prepends a batch dim: weights then travel as [1, ...].
    """
    batching = max_batch_size > 0
    inputs = [_tensor(i.name, _ttype(i.dtype), _dims(i, batching)) for i in bundle.inputs]
    inputs.append(_tensor(CONTROL_INPUT, "TYPE_STRING", [1], optional=True))
    inputs += [_tensor(v.name, _ttype(v.np_dtype), [-1] * max(len(v.shape), 1), optional=True) for v in bundle.variables]
    outputs = [_tensor(o.name, _ttype(o.dtype), _dims(o, batching)) for o in bundle.outputs]
    outputs += [_tensor(VERSION_OUTPUT, "TYPE_UINT64", [1]), _tensor(RESULT_OUTPUT, "TYPE_STRING", [1])]
    lines = [
        f'name: "{name}"',
        'backend: "weightbundle"',
        f"max_batch_size: {max_batch_size}",
        "input [\n" + ",\n".join(inputs) + "\n]",
        "output [\n" + ",\n".join(outputs) + "\n]",
        f"instance_group [ {{ count: {instances} kind: {kind} }} ]",
    ]
    if batching:
        lines.append("dynamic_batching { max_queue_delay_microseconds: 500 }")
    params = {"bundle_filename": "model.bundle", **(parameters or {})}
    lines.append("parameters [\n" + ",\n".join(
        f'  {{ key: "{k}" value: {{ string_value: "{v}" }} }}' for k, v in params.items()) + "\n]")
    return "\n".join(lines) + "\n"
