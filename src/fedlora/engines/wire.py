"""Payloads, replies and client states as Flower records: tensors in ArrayRecords (fp32), the rest as JSON."""

from __future__ import annotations

import json
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, RecordDict

from ..core.tensors import StateDict

STATE_PREFIX, INFO = "state.", "fedlora"


def encode(states: dict[str, StateDict], info: dict[str, Any]) -> RecordDict:
    """A new RecordDict (never shared between messages) holding named states and a JSON-able dict."""
    content = RecordDict()
    for name, state in states.items():
        content[STATE_PREFIX + name] = ArrayRecord.from_torch_state_dict({k: v.detach().float() for k, v in state.items()})
    content[INFO] = ConfigRecord({"json": json.dumps(info, sort_keys=True, default=str)})
    return content


def decode(content: RecordDict) -> tuple[dict[str, StateDict], dict[str, Any]]:
    """The named states and the JSON-able dict of a RecordDict written by `encode`."""
    states = {key.removeprefix(STATE_PREFIX): {k: torch.as_tensor(v).clone() for k, v in rec.to_torch_state_dict().items()}
              for key, rec in content.items() if key.startswith(STATE_PREFIX)}
    info = json.loads(content[INFO]["json"]) if INFO in content else {}
    return states, info


def store_state(context_state: RecordDict, states: dict[str, StateDict], meta: dict[str, Any]) -> None:
    """Replace the fedlora client state kept in a node's Context.state."""
    for key in [k for k in context_state if k.startswith(STATE_PREFIX) or k == INFO]:
        del context_state[key]
    fresh = encode(states, meta)
    for key in fresh:
        context_state[key] = fresh[key]
