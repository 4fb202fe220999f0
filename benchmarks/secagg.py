"""What secure aggregation (SecAgg+, federation.secure_aggregation) costs against a plain mean, side by side.

1. The protocol alone, for 4, 16 and 100 clients: each client's vector is the demo's LoRA (all-MiniLM-L6-v2, r=8 on
   query and value: 73,728 scalars), all four stages run in this process through Flower's secaggplus_mod (the
   clients' work and the server's, one after the other, as the in-process engine runs them). Reported per round:
   seconds, bytes up and down per client against the plain upload (float32 LoRA up, the global LoRA down), and the
   largest error of the mean against the exact weighted mean.
2. The demo (4 clients, 6 rounds), FedIT and FedALT with and without it: final mean accuracy, seconds, CPU seconds and
   bytes per round.

Results: benchmarks/results/secagg.{md,json}. Usage: python benchmarks/secagg.py [--quick] [--skip-demo]
[--clients N ...] [--num-shares K] (--quick: 4 and 16 clients only, 2 demo rounds; --clients/--num-shares: only
those protocol rows, merged into the stored results, with K neighbours per client instead of all).
"""

from __future__ import annotations

from fedlora.core.offline import use_offline

use_offline()  # before transformers is imported

import argparse  # noqa: E402
import json  # noqa: E402
import shlex  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

RESULTS = Path(__file__).parent / "results"
DEMO_LORA = 6 * 2 * 2 * 8 * 384  # 6 layers x (query, value) x (A, B) x r x 384


def protocol_row(n: int, length: int = DEMO_LORA, seed: int = 0, num_shares: int | None = None) -> dict:
    """One SecAgg+ round of n clients over vectors of `length`: seconds, bytes per client, error of the mean."""
    from flwr.common.serde import recorddict_to_proto

    from fedlora.algorithms import Payload
    from fedlora.core.config import SecAggConfig
    from fedlora.engines.secagg import InProcessNodes, Protocol, secure_mean

    rng = np.random.default_rng(seed)
    vectors = {f"c{i:03d}": rng.normal(0, 0.02, length) for i in range(n)}
    weights = {cid: int(w) for cid, w in zip(vectors, rng.integers(50, 200, n))}

    class Nodes(InProcessNodes):
        def produce(self, cid):
            return vectors[cid], weights[cid], {}

    nodes = Nodes(1, dict.fromkeys(vectors, Payload()), None, seed)
    sizes = {"up": 0, "down": 0}

    def exchange(stage, contents):
        answers = nodes.exchange(stage, contents)
        sizes["down"] += sum(recorddict_to_proto(c).ByteSize() for c in contents.values())
        sizes["up"] += sum(recorddict_to_proto(a).ByteSize() for a in answers.values() if not isinstance(a, str))
        return answers

    cfg = SecAggConfig(**({"num_shares": num_shares} if num_shares else {}))
    protocol = Protocol.for_round(cfg, n, max(weights.values()))
    start, cpu = time.perf_counter(), time.process_time()
    result = secure_mean(protocol, nodes.node_ids, length, exchange, seed, 1)
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu
    start = time.perf_counter()
    exact = sum(weights[c] * vectors[c] for c in vectors) / sum(weights.values())
    plain_seconds = time.perf_counter() - start
    assert result.problem is None, result.problem
    return {"clients": n, "scalars": length, "shares": protocol.num_shares, "threshold": protocol.threshold,
            "seconds": seconds, "cpu_seconds": cpu_seconds, "plain_seconds": plain_seconds,
            # down: the protocol's messages plus the payload (a global LoRA of `length` float32), as in a plain round
            "bytes_up_per_client": sizes["up"] / n, "bytes_down_per_client": sizes["down"] / n + 4 * length,
            "plain_bytes_per_client": 4 * length, "max_error": float(np.abs(result.mean - exact).max()),
            "error_bound": float(n * 2 * 8.0 / 2**22 / (sum(weights.values()) / max(weights.values())))}


def demo_row(method: str, secure: bool, rounds: int, out: Path) -> dict:
    """The demo with `method`, secure aggregation on or off: final accuracy, per-round seconds and bytes."""
    from fedlora import run_experiment

    result = run_experiment("demo", [f"algorithm.name={method}", f"federation.rounds={rounds}",
                                     f"federation.secure_aggregation={str(secure).lower()}", "engine.progress=false",
                                     f"output_dir={out / f'{method}-{secure}'}"], overwrite=True)
    rounds_ = result.rounds[1:]
    clients = len(rounds_[-1]["fit"])
    return {"method": method, "secure": secure, "rounds": len(rounds_),
            "accuracy": rounds_[-1]["summary"]["mean"]["accuracy"],
            "fit_seconds": sum(r["fit_seconds"] for r in rounds_) / len(rounds_),
            "cpu_seconds": sum(r["cpu_seconds"] for r in rounds_) / len(rounds_),
            "bytes_up_per_client": sum(r["comm"]["bytes_up"] for r in rounds_) / len(rounds_) / clients,
            "bytes_down_per_client": sum(r["comm"]["bytes_down"] for r in rounds_) / len(rounds_) / clients}


def render(data: dict) -> str:
    """secagg.md from the results."""
    lines = ["# Secure aggregation: what it costs", "", f"Command: `{data['command']}` ({data['measured']}, "
             "2-core CPU machine, in process; absolute times vary with the machine's load, ratios less)"
             + (f"; extra rows: `{data['extra_command']}`" if data.get("extra_command") else "") + ".", "",
             "## The protocol alone (SecAgg+ through Flower's secaggplus_mod, every client's and the server's work)", "",
             "Each client's vector: the demo's LoRA (73,728 scalars); weights 50-199 examples; Flower's defaults "
             "(every client a neighbour, threshold half of them, clipping range 8, 2^22 levels, modulus 2^32).", "",
             "| clients | neighbours (threshold) | seconds / round (plain mean) | CPU s | KB up / client (plain) | "
             "KB down / client (plain) | max error of the mean (bound) |", "|---|---|---|---|---|---|---|"]
    for r in sorted(data["protocol"], key=lambda r: (r["clients"], -r["shares"])):
        lines.append(f"| {r['clients']} | {r['shares']} ({r['threshold']}) | {r['seconds']:.2f} ({r['plain_seconds']:.4f}) | "
                     f"{r['cpu_seconds']:.2f} | "
                     f"{r['bytes_up_per_client'] / 1024:.0f} ({r['plain_bytes_per_client'] / 1024:.0f}) | "
                     f"{r['bytes_down_per_client'] / 1024:.0f} ({r['plain_bytes_per_client'] / 1024:.0f}) | "
                     f"{r['max_error']:.2e} ({r['error_bound']:.2e}) |")
    lines += ["", "Every client a neighbour costs O(n^2) key agreements, pairwise masks and Shamir shares: for 100 "
              "clients set `federation.secagg.num_shares` to a count (21 here, threshold 10).", "",
              "Up: the masked vector is int64 (8 bytes a scalar, twice float32) plus two public keys, the "
              "encrypted shares for every neighbour and the unmasking shares. Down: a global LoRA (float32, as in a plain round) "
              "plus the other clients' keys and the shares addressed to this client.", ""]
    if data.get("demo"):
        lines += ["## The demo (4 clients, all-MiniLM-L6-v2), with and without", "",
                  "| method | secure | rounds | final accuracy | fit s / round | CPU s / round | KB up / client / round | "
                  "KB down / client / round |", "|---|---|---|---|---|---|---|---|"]
        for r in data["demo"]:
            lines.append(f"| {r['method']} | {'yes' if r['secure'] else 'no'} | {r['rounds']} | {100 * r['accuracy']:.1f} | "
                         f"{r['fit_seconds']:.1f} | {r['cpu_seconds']:.1f} | {r['bytes_up_per_client'] / 1024:.0f} | "
                         f"{r['bytes_down_per_client'] / 1024:.0f} |")
        lines += ["", "Seed 0. With 4 clients a round's protocol work is small beside training; whatever accuracy "
                  "differs comes from the quantization (one level is 3.8e-6) carried through training."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="4 and 16 clients, 2 demo rounds")
    parser.add_argument("--skip-demo", action="store_true", help="the protocol rows only")
    parser.add_argument("--clients", type=int, nargs="+", help="only these protocol rows, merged into the stored ones")
    parser.add_argument("--num-shares", type=int, help="neighbours per client (default: all of the round's clients)")
    args = parser.parse_args()
    command = "python benchmarks/secagg.py " + shlex.join(sys.argv[1:])
    data = {"command": command, "measured": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "protocol": [],
            "demo": []}
    stored = RESULTS / "secagg.json"
    if args.clients and stored.exists():  # extra rows: everything else as it was measured
        data = {**json.loads(stored.read_text()), "extra_command": command}
    for n in args.clients or ((4, 16) if args.quick else (4, 16, 100)):
        row = protocol_row(n, num_shares=args.num_shares)
        data["protocol"] = [r for r in data["protocol"] if (r["clients"], r["shares"]) != (n, row["shares"])] + [row]
        print(json.dumps(row), flush=True)
    if not args.skip_demo and not args.clients:
        with tempfile.TemporaryDirectory() as tmp:
            for method in ("fedit", "fedalt"):
                for secure in (False, True):
                    data["demo"].append(demo_row(method, secure, 2 if args.quick else 6, Path(tmp)))
                    print(json.dumps(data["demo"][-1]), flush=True)
    name = "secagg-quick" if args.quick else "secagg"
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(data, indent=1) + "\n")
    (RESULTS / f"{name}.md").write_text(render(data))
    print(render(data))


if __name__ == "__main__":
    main()
