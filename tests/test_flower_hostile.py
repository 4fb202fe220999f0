"""A hostile or broken node cannot crash the Flower ServerApp: every malformed, oversized or out-of-range reply
(train, evaluate, handshake) becomes that client's recorded failure, and unsafe client ids never get in."""

from __future__ import annotations

import io
import json
import math

import numpy as np
import pytest
import torch
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from numpy.lib import format as npy_format

from fedlora.adapters import AdapterSpec
from fedlora.algorithms import ClientInfo, Payload, build
from fedlora.core.config import build_config
from fedlora.core.errors import ClientFailure, ConfigError
from fedlora.engines.runtime import Evaluation
from fedlora.engines.validation import evaluation_problem, reply_problem
from fedlora.flower.client_app import make_client_app
from fedlora.flower.handshake import handshake
from fedlora.engines.observers import Observer
from fedlora.flower.transport import FlowerTransport, max_rank
from fedlora.flower.wire import (
    INFO,
    LAYOUT,
    PACKED,
    STATE_PREFIX,
    WireError,
    content_bytes,
    decode,
    encode,
)

from .conftest import tiny_config
from .test_flower import FakeGrid, _message

SPEC = AdapterSpec((("m0", 6, 5), ("m1", 6, 5)), r=2, alpha=4)
CLIENTS = ["c0", "c1", "c2"]
HOSTILE = "c2"  # its node (102) answers with whatever the test gives it


def _expert(r: int = 2) -> dict[str, torch.Tensor]:
    return {k: torch.randn(*shape) for k, shape in SPEC.lora_shapes(r).items()}


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def _npy_header(shape: tuple[int, ...], descr: str = "<f4") -> bytes:
    buffer = io.BytesIO()
    npy_format.write_array_header_1_0(buffer, {"descr": descr, "fortran_order": False, "shape": shape})
    return buffer.getvalue()


def _info(text: str) -> RecordDict:
    return RecordDict({INFO: ConfigRecord({"json": text})})


def _with_array(array: Array) -> RecordDict:
    content = encode({}, {"num_examples": 1, "metrics": {}})
    content[STATE_PREFIX + "global"] = ArrayRecord({"m0.lora_A": array})
    return content


def _with_layout(layout_json: str, arrays: dict[str, np.ndarray] | None = None) -> RecordDict:
    """A packed state (12 numbers) whose layout record, or whose arrays, a node replaced."""
    content = encode({"global": {"m0.lora_A": torch.zeros(2, 6)}}, {"num_examples": 1, "metrics": {}})
    content[LAYOUT] = ConfigRecord({"json": layout_json})
    if arrays is not None:
        content[STATE_PREFIX + "global"] = ArrayRecord({k: Array(v) for k, v in arrays.items()})
    return content


MALFORMED = {
    "info not JSON": _info("{not json"),
    "info a JSON list": _info("[1, 2]"),
    "info deeply nested": _info("[" * 100_000 + "]" * 100_000),
    "info a 5000-digit integer": _info("{\"num_examples\": " + "9" * 5000 + "}"),
    "info a MetricRecord": RecordDict({INFO: MetricRecord({"json": 1.0})}),
    "info json as bytes": RecordDict({INFO: ConfigRecord({"json": b"{}"})}),
    "a ConfigRecord where an ArrayRecord belongs": RecordDict({STATE_PREFIX + "global": ConfigRecord({"a": 1})}),
    "integer array": _with_array(Array(np.arange(6, dtype=np.int64).reshape(2, 3))),
    "string array": _with_array(Array(dtype="<U3", shape=(2,), stype="numpy.ndarray", data=_npy(np.array(["a", "b"])))),
    "complex array": _with_array(Array(np.zeros((2, 6), dtype=np.complex64))),
    "float128 array": _with_array(Array(np.zeros((2, 6), dtype=np.longdouble))),
    "random bytes": _with_array(Array(dtype="float32", shape=(2, 6), stype="numpy.ndarray", data=b"\x93NUMPY\x01garbage")),
    "pickled object array": _with_array(Array(dtype="object", shape=(1,), stype="numpy.ndarray",
                                              data=b"\x93NUMPY\x01\x00v\x00{'descr': '|O', 'fortran_order': False, "
                                                   b"'shape': (1,), }" + b" " * 60 + b"\n\x80\x04N.")),
    "another serialization": _with_array(Array(dtype="float32", shape=(2, 6), stype="torch.raw", data=b"\0" * 48)),
    "an .npy header claiming 4 TB": _with_array(Array(dtype="float32", shape=(2, 6), stype="numpy.ndarray",
                                                      data=_npy_header((10**6, 10**6)) + b"\0" * 48)),
    "a truncated body": _with_array(Array(dtype="float32", shape=(2, 6), stype="numpy.ndarray",
                                          data=_npy_header((2, 6)) + b"\0" * 47)),
    "shape it does not declare": _with_array(Array(dtype="float32", shape=(6, 2), stype="numpy.ndarray",
                                                   data=_npy(np.zeros((2, 6), dtype=np.float32)))),
    "a layout that is not JSON": _with_layout("{"),
    "a layout that is a list": _with_layout('[["m0.lora_A", [2, 6]]]'),
    "a layout not a list of pairs": _with_layout('{"global": {"m0.lora_A": [2, 6]}}'),
    "a layout with more numbers than the array": _with_layout('{"global": [["m0.lora_A", [2, 7]]]}'),
    "a layout with fewer numbers than the array": _with_layout('{"global": [["m0.lora_A", [2, 5]]]}'),
    "a layout with a negative size": _with_layout('{"global": [["a", [-2, -6]]]}'),
    "a layout with a fractional size": _with_layout('{"global": [["a", [2.5, 6]]]}'),
    "a layout with a boolean size": _with_layout('{"global": [["a", [true, 12]]]}'),
    "a layout naming a tensor twice": _with_layout('{"global": [["a", [6]], ["a", [6]]]}'),
    "a layout over per-tensor arrays": _with_layout('{"global": [["a", [12]]]}', {"a": np.zeros(12, np.float32)}),
    "a layout over a 2-D array": _with_layout('{"global": [["a", [12]]]}', {PACKED: np.zeros((2, 6), np.float32)}),
    "a layout over an integer array": _with_layout('{"global": [["a", [12]]]}', {PACKED: np.zeros(12, np.int32)}),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_decode_refuses_what_encode_cannot_write(case):
    with pytest.raises(WireError):
        decode(MALFORMED[case])


def test_each_state_travels_as_one_array_and_comes_back_exactly():
    """Flower sends every Array as objects of its own (one request each): a state is one array, not one per tensor."""
    from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

    states = {"own": {f"m{i}.lora_{ab}": torch.randn(4, 8) for i in range(12) for ab in "AB"},
              "head": {"classifier.weight": torch.randn(3, 8), "classifier.bias": torch.randn(3),
                       "empty": torch.zeros(0, 2)},
              "none": {}}
    content = encode(states, {"num_examples": 1})
    arrays = [o for o in get_all_nested_objects(content).values() if type(o).__name__ == "Array"]
    assert len(arrays) == len(states)
    decoded, info = decode(content)
    assert info == {"num_examples": 1} and decoded.keys() == states.keys()
    for name, state in states.items():
        assert list(decoded[name]) == list(state)  # in order
        for key, value in state.items():
            assert decoded[name][key].shape == value.shape and torch.equal(decoded[name][key], value), (name, key)
            assert decoded[name][key].untyped_storage().nbytes() == value.numel() * 4  # its own, not a view


def test_decode_reads_a_big_endian_float_array_and_content_bytes_counts_declared_sizes():
    states, _ = decode(_with_array(Array(np.arange(12, dtype=">f4").reshape(2, 6))))
    assert torch.equal(states["global"]["m0.lora_A"], torch.arange(12.0).reshape(2, 6))
    honest = encode({"global": _expert()}, {"num_examples": 1})
    assert content_bytes(honest) >= 4 * SPEC.lora_numel()
    liar = _with_array(Array(dtype="float32", shape=(10**6, 10**6), stype="numpy.ndarray", data=b"x"))
    assert content_bytes(liar) >= 4 * 10**12  # what it claims, not the byte it carries


# -- the engine, against nodes that answer with arbitrary content --------------------------------------------
class HostileNodes:
    """A ClientApp stand-in: nodes 100.. answer honestly, node 102 with `self.content` (set per example)."""

    def __init__(self):
        self.content: RecordDict | None = None

    def __call__(self, message: Message, context) -> Message:
        node, kind = context.node_id, message.metadata.message_type
        if node == 102:
            if self.content is None:  # FakeGrid turns it into an error reply, as Flower's runtime does
                raise RuntimeError("node broken")
            return Message(self.content, reply_to=message)
        if kind == MessageType.QUERY:
            info = {"client_id": CLIENTS[node - 100], "num_examples": 10, "task": "t", "order": node - 100}
        elif kind == MessageType.TRAIN:
            return Message(encode({"global": _expert()}, {"num_examples": 10, "metrics": {"loss": 1.0}}),
                           reply_to=message)
        else:
            info = {"metrics": {"accuracy": 0.5, "loss": 1.0}, "diagnostics": {"gate": {"m0": 0.5}}}
        return Message(encode({}, info), reply_to=message)


def _set_task_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    from flwr.supercore.task_identity import (
        TaskIdentity,  # what Flower's runtime sets for a ServerApp
    )

    for attr in ("_run_id", "_task_id", "_node_id"):
        monkeypatch.setattr(TaskIdentity, attr, 1, raising=False)


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    with pytest.MonkeyPatch.context() as monkeypatch:
        _set_task_identity(monkeypatch)
        yield _engine(tmp_path_factory.mktemp("hostile"))


def _engine(tmp):
    cfg = build_config(tiny_config(tmp, engine={"name": "flower-sim", "num_clients": 3, "progress": False}))
    server, _ = build("fedit", {}, SPEC, 0)
    nodes = HostileNodes()
    grid = FakeGrid(nodes, 3)
    eng = FlowerTransport(cfg, server, [ClientInfo(c, 10, "t") for c in CLIENTS], grid,
                          {c: 100 + i for i, c in enumerate(CLIENTS)})
    eng.hostile = nodes
    return eng


def _fit(engine, content):
    engine.hostile.content = content
    payloads = {c: Payload(expects=frozenset({"global"})) for c in CLIENTS}
    return engine.fit(1, payloads, Observer()), payloads


def _evaluate(engine, content):
    engine.hostile.content = content
    return engine.evaluate(1, {c: Payload() for c in CLIENTS}, Observer())


@pytest.mark.parametrize("case", list(MALFORMED))
def test_a_malformed_reply_is_that_clients_failure(engine, case):
    (replies, failures), _ = _fit(engine, MALFORMED[case])
    assert set(replies) == {"c0", "c1"} and "malformed reply" in failures[HOSTILE]
    evaluations, failures = _evaluate(engine, MALFORMED[case])
    assert set(evaluations) == {"c0", "c1"} and "malformed reply" in failures[HOSTILE]


@pytest.mark.parametrize("info,reason", [
    ({"metrics": {}}, "num_examples"),
    ({"num_examples": "48", "metrics": {}}, "num_examples"),
    ({"num_examples": -1, "metrics": {}}, "num_examples"),
    ({"num_examples": True, "metrics": {}}, "num_examples"),
    ({"num_examples": 4.5, "metrics": {}}, "num_examples"),
    ({"num_examples": 4}, "metrics are a NoneType"),
    ({"num_examples": 4, "metrics": [1.0]}, "metrics are a list"),
    ({"num_examples": 4, "metrics": {"loss": "low"}}, "not a number"),
    ({"num_examples": 4, "metrics": {"loss": float("nan")}}, "not a finite number"),
])
def test_ill_typed_train_info_is_that_clients_failure(engine, info, reason):
    (replies, failures), _ = _fit(engine, encode({"global": _expert()}, info))
    assert HOSTILE not in replies and reason in failures[HOSTILE]


@pytest.mark.parametrize("metrics,reason", [
    ({"accuracy": float("nan")}, "not a finite number"),
    ({"accuracy": float("inf")}, "not a finite number"),
    ({"accuracy": 1e300}, "outside [0, 1]"),
    ({"macro_f1": -0.1}, "outside [0, 1]"),
    ({"rougeL": 1.5}, "outside [0, 1]"),
    ({"exact_match": 2}, "outside [0, 1]"),
    ({"loss": -1.0}, "outside [0, 10000]"),
    ({"loss": 1e300}, "outside [0, 10000]"),
    ({"accuracy": 0.5, "bleu": 1e300}, "beyond +-1e+06"),
    ({"loss": float("inf")}, "not a finite number"),
    ({"perplexity": float("-inf")}, "not a finite number"),
    ({"accuracy": "0.5"}, "not a number"),
    ({"accuracy": None}, "not a number"),
    ({"accuracy": [0.5]}, "not a number"),
    ([0.5], "not a mapping"),
])
def test_an_out_of_range_evaluation_is_that_clients_failure(engine, metrics, reason):
    evaluations, failures = _evaluate(engine, encode({}, {"metrics": metrics}))
    assert set(evaluations) == {"c0", "c1"} and reason in failures[HOSTILE]


def test_evaluation_problem():
    assert evaluation_problem(Evaluation({"accuracy": 1.0, "macro_f1": 0.0, "loss": 0.0, "rouge1": 0.3, "bleu": 40.0},
                                         {"cluster": 2, "gate": {"m0": 0.4}})) is None
    assert "diagnostic 'gate'" in evaluation_problem(Evaluation({"loss": 1.0}, {"gate": {"m0": float("nan")}}))
    assert "diagnostic 'w'" in evaluation_problem(Evaluation({"loss": 1.0}, {"w": "high"}))
    assert "not a mapping" in evaluation_problem(Evaluation({"loss": 1.0}, [1.0]))


def test_an_oversized_train_reply_is_refused_before_it_is_decoded(engine, monkeypatch):
    from fedlora.flower import exchange

    decoded = []
    monkeypatch.setattr(exchange, "decode", lambda content: decoded.append(set(content)) or decode(content))
    big = encode({"global": _expert(), "extra": {"m0.router": torch.zeros(1_100_000, 1)}}, {"num_examples": 1})
    (_, failures), _ = _fit(engine, big)
    assert "reply refused" in failures[HOSTILE] and not any(STATE_PREFIX + "extra" in keys for keys in decoded)
    liar = _with_array(Array(dtype="float32", shape=(10**6, 10**6), stype="numpy.ndarray", data=b"x"))
    (replies, failures), _ = _fit(engine, liar)
    assert "reply refused" in failures[HOSTILE]
    # the bound leaves room for every legitimate reply: the widest router and a LoRA at the largest rank
    widest = {f"{p}.router": torch.zeros(2 * len(CLIENTS) - 1, d_in) for p, d_in, _ in SPEC.modules}
    (replies, failures), _ = _fit(engine, encode({"global": _expert(engine.config.lora.r), "router": widest},
                                                 {"num_examples": 1, "metrics": {}}))
    assert HOSTILE in replies
    _, failures = _evaluate(engine, encode({"x": {"m0.router": torch.zeros(1_100_000, 1)}}, {"metrics": {}}))
    assert "reply refused" in failures[HOSTILE]  # an evaluation carries no tensors


def test_max_rank_covers_every_clients_lora_r(tmp_path):
    def rank(**clients):
        return max_rank(build_config(tiny_config(tmp_path, clients=clients)))

    assert rank() == 4  # lora.r
    assert rank(lora_r=2) == 4 and rank(lora_r=16) == 16
    assert rank(lora_r=[2, 8, 4, 4]) == 8 and rank(lora_r={"verb_class-0": 12}) == 12
    assert rank(lora_r={"rule": "proportional", "base": 6.4}) == 7
    assert rank(lora_r={"rule": "proportional", "min": 2, "max": 32}) == 32


# -- hypothesis: arbitrary contents through the Grid ------------------------------------------------------
JSON = st.recursive(st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=20),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
                    max_leaves=12)
NUMBER_LIKE = st.one_of(st.integers(-5, 10**6), st.floats(), st.booleans(), st.text(max_size=5), st.none())
INFO_FIELDS = st.fixed_dictionaries({}, optional={
    "num_examples": NUMBER_LIKE | JSON,
    "metrics": st.dictionaries(st.sampled_from(["accuracy", "loss", "rouge1", "macro_f1", "x"]), NUMBER_LIKE | JSON,
                               max_size=4) | JSON,
    "diagnostics": st.dictionaries(st.text(max_size=8), NUMBER_LIKE | JSON, max_size=3) | JSON,
    "client_id": st.sampled_from(["c0", "c2", "c9", "../x", "/etc/passwd", "a" * 300, ""]) | JSON,
    "task": st.text(max_size=3) | JSON, "order": NUMBER_LIKE | JSON, "extra": JSON})
TENSOR = st.builds(lambda shape, dtype, fill: torch.full(shape, fill).to(dtype),
                   st.tuples(st.integers(0, 7), st.integers(0, 7)),
                   st.sampled_from([torch.float32, torch.float16, torch.float64, torch.int64, torch.bool]),
                   st.floats(allow_nan=True, allow_infinity=True, width=16))
STATES = st.dictionaries(st.sampled_from(["global", "router", "x"]),
                         st.dictionaries(st.sampled_from(["m0.lora_A", "m0.lora_B", "m1.lora_A", "m0.router", "k"]),
                                         TENSOR, max_size=4), max_size=2)


NPY_BYTES = st.one_of(  # random bytes, random bytes after the .npy magic, and real headers over random bodies
    st.binary(max_size=64), st.binary(max_size=64).map(lambda b: b"\x93NUMPY\x01\x00" + b),
    st.builds(lambda shape, descr, body: _npy_header(shape, descr) + body,
              st.tuples(st.integers(0, 3), st.integers(0, 3)) | st.tuples(st.integers(0, 10**7)),
              st.sampled_from(["<f4", ">f8", "<f2", "<i4", "|O", "<c8", "|b1", "<U2"]), st.binary(max_size=80)))


def _raw_array(dtype, shape, stype, data):
    return ArrayRecord({"k": Array(dtype=dtype, shape=shape, stype=stype, data=data)})


CONTENT = st.one_of(
    st.builds(encode, STATES, INFO_FIELDS),
    st.builds(_info, st.text(max_size=40) | JSON.map(lambda v: json.dumps(v))),
    st.builds(lambda key, record: RecordDict({key: record}), st.sampled_from([INFO, STATE_PREFIX + "global", "other"]),
              st.builds(_raw_array, st.sampled_from(["float32", "float64", ">f8", "int8", "<U2", "x"]),
                        st.tuples(st.integers(0, 10**7)) | st.tuples(st.integers(0, 3), st.integers(0, 3)),
                        st.sampled_from(["numpy.ndarray", "?"]), NPY_BYTES)
              | st.builds(lambda d: ConfigRecord(d), st.dictionaries(st.sampled_from(["json", "a"]),
                                                                       st.text(max_size=8) | st.binary(max_size=8)
                                                                       | st.integers(), max_size=2))
              | st.builds(lambda d: MetricRecord(d), st.dictionaries(st.sampled_from(["json", "m"]), st.floats(),
                                                                       max_size=2))),
    st.builds(lambda layout: _with_layout(json.dumps(layout)), JSON | st.dictionaries(
        st.just("global"), st.lists(st.tuples(st.text(max_size=3), st.lists(st.integers(-2, 13), max_size=3)),
                                    max_size=3))),
    st.builds(lambda arr: _with_array(Array(arr)), st.sampled_from([np.zeros((2, 6), np.float32),
                                                                     np.full((2, 6), np.nan, np.float32),
                                                                     np.zeros(3, np.uint8), np.zeros((2, 6, 1), ">f8")])),
)
HYPOTHESIS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@HYPOTHESIS
@given(content=CONTENT)
def test_fuzzed_train_replies_never_raise_and_are_recorded(engine, content):
    (replies, failures), payloads = _fit(engine, content)
    assert set(replies) | set(failures) == set(CLIENTS) and not set(replies) & set(failures)
    assert {"c0", "c1"} <= set(replies)
    if HOSTILE in replies:  # then the loop's own checks must be able to judge it without raising
        reply_problem(replies[HOSTILE], payloads[HOSTILE], SPEC, None, True)
    else:
        assert isinstance(failures[HOSTILE], str) and failures[HOSTILE]


@HYPOTHESIS
@given(content=CONTENT)
def test_fuzzed_evaluation_replies_never_raise_and_are_recorded(engine, content):
    evaluations, failures = _evaluate(engine, content)
    assert set(evaluations) | set(failures) == set(CLIENTS) and not set(evaluations) & set(failures)
    for evaluation in evaluations.values():  # what is accepted is a valid JSON record, without NaN or Infinity
        json.dumps({"metrics": evaluation.metrics, "diagnostics": evaluation.diagnostics}, allow_nan=False)
        assert all(math.isfinite(v) for v in evaluation.metrics.values())


@HYPOTHESIS
@given(content=CONTENT)
def test_fuzzed_handshake_answers_never_raise_and_leave_the_node_out(engine, content):
    engine.hostile.content = content
    found = handshake(engine.grid, 3, wait=5.0, needed=1)  # c0 or c1 always answers properly
    assert "c0" in found or "c1" in found  # a duplicate claim leaves out both claimants, never both honest nodes
    for cid, (node, info) in found.items():
        assert node == {"c0": 100, "c1": 101}.get(cid, 102)
        assert isinstance(info["num_examples"], int) and not isinstance(info["num_examples"], bool)
        assert isinstance(info["order"], int) and isinstance(info["task"], str)
        assert "/" not in cid and ".." not in cid and len(cid) <= 100


HUGE = st.one_of(st.integers(), st.integers(10**300, 10**320), st.integers(max_value=0), st.floats(allow_nan=True),
                 st.booleans(), st.none(), st.text(max_size=5))


@HYPOTHESIS
@given(num_examples=HUGE, order=HUGE)
def test_fuzzed_handshake_integers_leave_the_node_out_or_stay_usable_weights(engine, num_examples, order):
    """#37: a count of 10**309 once ended the run in round 1 (float() of it), a count of 0 with its zero weight."""
    engine.hostile.content = encode({}, {"client_id": "c2", "num_examples": num_examples, "task": "t", "order": order})
    found = handshake(engine.grid, 3, wait=5.0, needed=2)
    assert {"c0", "c1"} <= set(found)
    for _, info in found.values():
        assert 1 <= info["num_examples"] <= 10**12 and math.isfinite(float(info["num_examples"]))


@pytest.mark.parametrize("count,reason", [(10**309, "an integer of 1027 bits"), (0, "between 1 and 1e+12"),
                                          (-3, "between 1 and 1e+12")])
def test_an_absurd_or_empty_example_count_leaves_the_node_out_with_the_reason(engine, count, reason, caplog):
    engine.hostile.content = encode({}, {"client_id": "c2", "num_examples": count, "task": "t", "order": 2})
    assert set(handshake(engine.grid, 3, wait=5.0, needed=2)) == {"c0", "c1"}
    assert "node 102 left out" in caplog.text and reason in caplog.text


@pytest.mark.parametrize("claim", ["../x", "/etc/passwd", "a" * 300, "", 7, None, "c0"])
def test_a_node_claiming_an_unsafe_or_taken_client_id_is_left_out(engine, claim, caplog):
    engine.hostile.content = encode({}, {"client_id": claim, "num_examples": 3, "task": "t", "order": 2})
    found = handshake(engine.grid, 3, wait=5.0, needed=1)
    assert set(found) == ({"c1"} if claim == "c0" else {"c0", "c1"})
    assert "node 102 left out" in caplog.text
    with pytest.raises(ClientFailure, match="answered the handshake properly, fewer than federation.min_clients=3"):
        handshake(engine.grid, 3, wait=5.0, needed=3)


@pytest.mark.parametrize("answer,reason", [
    (None, "it failed the handshake: RuntimeError: node broken"),
    (encode({"x": {"k": torch.zeros(1_100_000, 1)}}, {"client_id": "c2", "num_examples": 1, "task": "t", "order": 2}),
     "reply refused"),
    (encode({}, {"client_id": "c2", "num_examples": "3", "task": "t", "order": 2}), "num_examples"),
    (encode({}, {"client_id": "c2", "num_examples": 3, "task": ["t"], "order": 2}), "its task"),
    (encode({}, {"client_id": "c2", "num_examples": 3, "task": "t", "order": 2.5}), "its order"),
    (_info("]"), "malformed reply"),
])
def test_a_broken_handshake_answer_leaves_the_node_out(engine, answer, reason, caplog):
    engine.hostile.content = answer
    assert set(handshake(engine.grid, 3, wait=5.0, needed=2)) == {"c0", "c1"}
    assert "node 102 left out" in caplog.text and reason in caplog.text
    engine.hostile.content = encode({}, {"client_id": "c2", "num_examples": 3, "task": "t", "order": 2})
    assert set(handshake(engine.grid, 3, wait=5.0, needed=2, admitted=["c0", "c2"])) == {"c0", "c2"}
    with pytest.raises(ClientFailure, match="fewer than federation.min_clients=3"):
        handshake(engine.grid, 3, wait=5.0, needed=3, admitted=["c0", "c2"])


# -- end to end: server_main with one hostile node among real ClientApps -----------------------------------
@pytest.fixture
def task_identity(monkeypatch):
    _set_task_identity(monkeypatch)


def test_a_run_survives_a_node_that_sends_infinity_and_garbage(tmp_path, task_identity):
    from fedlora.flower.server_app import server_main

    cfg = build_config(tiny_config(tmp_path, federation={"rounds": 2},
                                   engine={"name": "flower-sim", "num_clients": 4, "progress": False}))
    app = make_client_app(cfg)

    def hostile(message, context):
        reply = app(message, context)
        kind = message.metadata.message_type
        if context.node_id == 103 and kind == MessageType.EVALUATE:
            return Message(encode({}, {"metrics": {"accuracy": float("inf"), "loss": 1e300}}), reply_to=message)
        if context.node_id == 102 and kind == MessageType.TRAIN:
            states, info = decode(reply.content)
            return Message(encode(states, {**info, "num_examples": "lots"}), reply_to=message)
        return reply

    server_main(cfg, FakeGrid(hostile, 4))
    text = (tmp_path / "run" / "metrics.jsonl").read_text()
    assert "Infinity" not in text and "NaN" not in text
    records = [json.loads(line) for line in text.splitlines()]
    assert [r["round"] for r in records] == [0, 1, 2]
    assert all("outside [0, 1]" in r["eval_failures"]["verb_class-1"] or "finite" in r["eval_failures"]["verb_class-1"]
               for r in records)
    assert all(math.isfinite(v) for r in records for v in r["summary"]["mean"].values())
    assert "num_examples" in records[1]["failures"]["verb_class-0"] and "verb_class-0" not in records[1]["fit"]


def test_a_node_claiming_an_unsafe_client_id_is_left_out_of_the_run(tmp_path, task_identity):
    from fedlora.flower.server_app import server_main

    cfg = build_config(tiny_config(tmp_path, federation={"rounds": 1},
                                   engine={"name": "flower-sim", "num_clients": 4, "progress": False}))
    app = make_client_app(cfg)

    def impostor(message, context):
        if context.node_id == 101 and message.metadata.message_type == MessageType.QUERY:
            return Message(encode({}, {"client_id": "../../etc", "num_examples": 48, "task": "t", "order": 1}),
                           reply_to=message)
        return app(message, context)

    server_main(cfg, FakeGrid(impostor, 4))
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert set(records[-1]["eval"]) == {"noun_topic-0", "verb_class-0", "verb_class-1"}
    assert not any((tmp_path / "run").rglob("*etc*"))


@pytest.mark.parametrize("cid", ["../evil", "/abs/path", "a" * 300, "with space"])
def test_the_client_app_refuses_an_unsafe_node_client_id(tmp_path, cid):
    from flwr.app import Context

    app = make_client_app(build_config(tiny_config(tmp_path)))
    for extra in ({}, {"train-file": str(tmp_path / "train.jsonl")}):
        context = Context(run_id=1, node_id=7, node_config={"client-id": cid, **extra}, state=RecordDict(), run_config={})
        with pytest.raises(ConfigError, match="SuperNode client-id .* is not a safe name"):
            app(_message(MessageType.QUERY, {}, {}), context)


@pytest.mark.parametrize("claim,reason", [("intruder", "which this run does not admit"),
                                          ("verb_class-1", "2 nodes claim client 'verb_class-1'")])
def test_an_extra_node_is_left_out_by_default_with_its_reason(tmp_path, task_identity, claim, reason):
    """#37: without engine.clients a 5th node answering as `intruder` once took part and its update was averaged."""
    from fedlora.flower.server_app import server_main

    cfg = build_config(tiny_config(tmp_path, federation={"rounds": 1},
                                   engine={"name": "flower-sim", "num_clients": 4, "progress": False}))
    app = make_client_app(cfg)

    def with_intruder(message, context):
        if context.node_id == 104:  # a fifth node: no partition of the split is its own
            if message.metadata.message_type == MessageType.QUERY:
                return Message(encode({}, {"client_id": claim, "num_examples": 10**6, "task": "noun_topic",
                                           "order": 0}), reply_to=message)
            raise AssertionError("a node left out at the handshake is never sent a round")
        return app(message, context)

    server_main(cfg, FakeGrid(with_intruder, 5))
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert claim not in records[-1]["eval"] and claim not in records[-1].get("fit", {})
    logged = (tmp_path / "run" / "run.log").read_text()
    assert "admitting client ids noun_topic-0, noun_topic-1, verb_class-0, verb_class-1" in logged
    assert "node 104 left out" in logged and reason in logged


def test_engine_num_clients_caps_the_admitted_nodes(tmp_path, task_identity):
    from fedlora.flower.server_app import server_main

    cfg = build_config(tiny_config(tmp_path, federation={"rounds": 1},
                                   engine={"name": "flower-sim", "num_clients": 3, "progress": False}))
    server_main(cfg, FakeGrid(make_client_app(cfg), 4))
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(records[-1]["eval"]) == 3
    assert "engine.num_clients=3 are admitted already" in (tmp_path / "run" / "run.log").read_text()
