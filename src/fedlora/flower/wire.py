"""Payloads, replies and client states as Flower records: tensors in ArrayRecords (fp32), the rest as JSON.

Each named state travels as one Array, its tensors flattened end to end, with their names and shapes in a JSON
layout record. Flower 1.42 sends every Array (and each of its chunks) as an object of its own, one request each:
a LoRA state of 24 tensors was 48 requests per message, most of a flower-local round (docs/deployment.md).
Records with one Array per tensor (what fedlora wrote before) are still read.

A reply comes from a node the server does not control, so `decode` trusts nothing in it: a record of the
wrong type, an array that is not a plain float array, or an info record that is not a JSON object is a
`WireError`, which the engine records as that client's failure. `content_bytes` tells what a reply's arrays
would hold once decoded, so that an oversized reply is refused before any of it is copied.
"""

from __future__ import annotations

import json
import math
from io import BytesIO
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict
from numpy.lib import format as npy_format

from ..core.tensors import StateDict

STATE_PREFIX, INFO, LAYOUT = "state.", "fedlora", "fedlora.layout"
PACKED = "packed"  # the one Array of a packed state
NUMPY_STYPE = "numpy.ndarray"  # the only serialization `encode` writes (Flower's SType.NUMPY)
FLOAT_SIZES = (2, 4, 8)  # float16/32/64: what torch can hold (float128 is a numpy-only type)
INFO_BYTES = 4 * 2**20  # allowance for a reply's JSON info and array headers, on top of its tensors
SIZE_FACTOR = 4  # how much larger than the largest legitimate state set a reply may be before it is refused
_NPY_HEADERS = {(1, 0): npy_format.read_array_header_1_0, (2, 0): npy_format.read_array_header_2_0}
# the keys a server message adds to its payload's config (transport.py writes them, client_app.py reads them)
ROUND, EXPECTS = "round", "expects"
RUN, FINAL = "run", "final"  # the run's id (nodes keep it with their states); the last message: write the model


class WireError(ValueError):
    """A record that `encode` could not have written: the node sent something malformed."""


def encode(states: dict[str, StateDict], info: dict[str, Any]) -> RecordDict:
    """A new RecordDict (never shared between messages) holding named states and a JSON-able dict."""
    content, layout = RecordDict(), {}
    for name, state in states.items():
        flat = [v.detach().float().reshape(-1) for v in state.values()]
        packed = torch.cat(flat) if flat else torch.zeros(0)
        content[STATE_PREFIX + name] = ArrayRecord.from_torch_state_dict({PACKED: packed})
        layout[name] = [[key, list(v.shape)] for key, v in state.items()]
    if layout:
        content[LAYOUT] = ConfigRecord({"json": json.dumps(layout)})
    content[INFO] = ConfigRecord({"json": json.dumps(info, sort_keys=True, default=str)})
    return content


def decode(content: RecordDict) -> tuple[dict[str, StateDict], dict[str, Any]]:
    """The named states and the JSON-able dict of a RecordDict written by `encode`; else a WireError."""
    if not isinstance(content, RecordDict):
        raise WireError(f"the content is a {type(content).__name__}, not a RecordDict")
    states = {}
    layouts = _json_record(content.get(LAYOUT), LAYOUT)
    for key, record in content.items():
        if not key.startswith(STATE_PREFIX):
            continue
        if not isinstance(record, ArrayRecord):
            raise WireError(f"record {key!r} is a {type(record).__name__}, not an ArrayRecord")
        name = key.removeprefix(STATE_PREFIX)
        if name in layouts:
            states[name] = _unpack(key, record, layouts[name])
        else:
            states[name] = {k: _tensor(f"{key}/{k}", a) for k, a in record.items()}
    return states, _json_record(content.get(INFO), INFO)


def _unpack(key: str, record: ArrayRecord, layout: Any) -> dict[str, torch.Tensor]:
    """The tensors of a packed state: its one array cut by `layout` ([[name, shape], ...]), each checked."""
    if list(record.keys()) != [PACKED]:
        raise WireError(f"record {key!r} has a layout but holds {sorted(record.keys())[:5]}, not one {PACKED!r} array")
    flat = _tensor(f"{key}/{PACKED}", record[PACKED])
    entries = layout if isinstance(layout, list) else [None]
    good = all(isinstance(e, list) and len(e) == 2 and isinstance(e[0], str) and isinstance(e[1], list)
               and all(type(d) is int and d >= 0 for d in e[1]) for e in entries)
    if not good or len({e[0] for e in entries}) != len(entries):
        raise WireError(f"the layout of {key!r} is not a list of distinct [name, shape] pairs")
    sizes = [math.prod(shape) for _, shape in entries]
    if flat.dim() != 1 or sum(sizes) != flat.numel():
        raise WireError(f"the layout of {key!r} describes {sum(sizes)} numbers, its array holds {flat.numel()}")
    return {name: piece.reshape(shape).clone() for (name, shape), piece in zip(entries, flat.split(sizes))}


def _tensor(where: str, array: Array) -> torch.Tensor:
    """A float tensor from one Array, refusing what numpy would parse but the algorithms cannot use."""
    data = getattr(array, "data", None)
    if getattr(array, "stype", None) != NUMPY_STYPE or not isinstance(data, bytes):
        raise WireError(f"{where} is not a serialized numpy array (stype {getattr(array, 'stype', None)!r})")
    buffer = BytesIO(data)
    # the .npy header is read and checked before any body: np.load would allocate the shape the header claims
    try:
        header = _NPY_HEADERS.get(npy_format.read_magic(buffer))
        if header is None:
            raise ValueError("an .npy format version other than 1.0 and 2.0")
        shape, fortran, dtype = header(buffer)
    except (ValueError, EOFError, SyntaxError, TypeError, RecursionError, MemoryError) as exc:
        raise WireError(f"{where} has no valid .npy header: {type(exc).__name__}: {str(exc)[:200]}") from None
    if dtype.kind != "f" or dtype.itemsize not in FLOAT_SIZES:
        raise WireError(f"{where} holds {dtype}, not a float array")
    if [*shape] != _declared_shape(array) or str(dtype) != getattr(array, "dtype", None):
        raise WireError(f"{where} holds a {dtype} array of shape {shape} but declares "
                        f"{getattr(array, 'dtype', None)} {_declared_shape(array)}")
    body = memoryview(data)[buffer.tell():]
    if len(body) != math.prod(shape) * dtype.itemsize:
        raise WireError(f"{where} has {len(body)} bytes of data for a {dtype} array of shape {shape}")
    value = np.frombuffer(body, dtype=dtype).reshape(shape, order="F" if fortran else "C")
    # a copy in native byte order: torch refuses big-endian arrays, and the tensor must not alias the message
    return torch.from_numpy(np.array(value, dtype=dtype.newbyteorder("="), order="C", copy=True))


def _declared_shape(array: Array) -> list[int] | None:
    shape = getattr(array, "shape", None)
    return [*shape] if isinstance(shape, (tuple, list)) else None


def _json_record(record: Any, key: str) -> dict[str, Any]:
    """The JSON object in a ConfigRecord's 'json' string ({} without the record); else a WireError."""
    if record is None:
        return {}
    if not isinstance(record, ConfigRecord) or not isinstance(record.get("json"), str):
        raise WireError(f"record {key!r} is a {type(record).__name__} without a 'json' string")
    try:  # RecursionError for deeply nested arrays, ValueError for an integer of over 4300 digits
        value = json.loads(record["json"])
    except (ValueError, RecursionError) as exc:
        raise WireError(f"record {key!r} is not JSON: {type(exc).__name__}: {str(exc)[:200]}") from None
    if not isinstance(value, dict):
        raise WireError(f"record {key!r} holds a JSON {type(value).__name__}, not an object")
    return value


def content_bytes(content: RecordDict) -> int:
    """Bytes a RecordDict's records hold or would hold decoded: each array's payload or its declared size,
    whichever is larger, plus every other record's own count."""
    total = 0
    for record in content.values():
        if isinstance(record, ArrayRecord):
            total += sum(_array_bytes(a) for a in record.values())
        else:
            try:
                total += record.count_bytes()
            except (ValueError, TypeError):  # a value Flower's own count refuses is as big as its text
                total += len(str(record))
    return total


def _array_bytes(array: Array) -> int:
    data = getattr(array, "data", b"")
    stored = len(data) if isinstance(data, (bytes, bytearray)) else 0
    try:  # the declared shape counts too: a small body claiming a huge shape is refused, not allocated
        declared = math.prod(int(d) for d in array.shape) * np.dtype(array.dtype).itemsize
    except (TypeError, ValueError, AttributeError):
        declared = 0
    return max(stored, declared)


def max_reply_bytes(lora_numel: int, router_numel: int, n_states: int) -> int:
    """The largest train reply the server reads: SIZE_FACTOR x n_states float32 states, each the larger of a
    LoRA expert at the largest rank (`lora_numel` scalars) and a router (`router_numel`), plus INFO_BYTES."""
    return SIZE_FACTOR * 4 * n_states * max(lora_numel, router_numel) + INFO_BYTES


def store_state(context_state: RecordDict, states: dict[str, StateDict], meta: dict[str, Any]) -> None:
    """Replace the fedlora client state kept in a node's Context.state."""
    for key in [k for k in context_state if k.startswith(STATE_PREFIX) or k in (INFO, LAYOUT)]:
        del context_state[key]
    fresh = encode(states, meta)
    for key in fresh:
        context_state[key] = fresh[key]
