"""Scale: 10, 100 and 1,000 simulated clients on one machine, and each method's server cost as clients grow.

(1) Engine. One fresh process per (method, N) runs `run_experiment` on the in-process engine with the tiny
    random BERT and a synthetic dataset of N clients x 10 records (JSONL), every client training one local step
    in each of 2 rounds, so that every client ends up holding its adapter state. Measured: peak RSS
    (getrusage), RSS at the end, seconds per fit round and per client fit, and the exact bytes of adapter state
    the run holds (client states + server state). Memory should grow only by the client states (one base model,
    no per-client copies): the fitted RSS growth per client is compared with the adapter state per client.
    A second run per N samples 10 clients per round: its per-round time should not grow with N.
(2) Server. Each method's `ServerAlgorithm.aggregate` (and the next round's `configure`, where FedALT computes
    every client's Rest-of-World) called directly on 10 / 100 / 1,000 replies of random adapter states of
    MiniLM's shapes (LoRA r=8 on query and value of 6 layers): FedIT averaging, FedALT Rest-of-World, FedLEASE
    clustering (the allocation round) and its clustered rounds, FLoRA stacking. Growth order = log-log slope.
Results: benchmarks/results/scale.{md,json,png}.
Usage: python benchmarks/scale.py [--quick] [--out DIR] [--methods fedit,fedalt]
"""

from __future__ import annotations

from fedlora.core.offline import use_offline

use_offline()  # before transformers is imported: a hub look-up blocks ~23 s

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import random  # noqa: E402
import resource  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

RESULTS = Path(__file__).parent / "results"
RECORDS_PER_CLIENT = (8, 2)  # train, test
MINILM_MODULES = tuple((f"bert.encoder.layer.{i}.attention.self.{m}", 384, 384) for i in range(6) for m in ("query", "value"))


# -- (1) engine: one process per (method, N) ----------------------------------------------------------------------

def synthetic_dataset(path: Path, n_clients: int, seed: int = 0) -> None:
    """N x 10 short classification records (4 labels) in one task: wordnet-demo cannot fill 1,000 clients."""
    rng = random.Random(seed)
    words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(3, 7))) for _ in range(400)]
    with open(path, "w") as fh:
        for _ in range(n_clients * sum(RECORDS_PER_CLIENT)):
            text = " ".join(rng.choice(words) for _ in range(rng.randint(3, 5)))
            fh.write(json.dumps({"task": "synthetic", "text": text, "label": f"c{rng.randrange(4)}"}) + "\n")


def live_rss() -> int:
    """Resident bytes after a garbage collection and giving freed heap pages back (what the process really holds)."""
    import ctypes
    import gc

    import psutil

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # glibc keeps freed pages of small allocations otherwise
    except OSError:
        pass
    return psutil.Process().memory_info().rss


def peak_rss() -> int:
    """The process's peak resident bytes so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def held_tensors(groups: list) -> dict:
    """Count and bytes of the distinct tensor storages in groups of named states (in process, the server's cache of a
    client's LoRA is the very tensor the client keeps, so it is counted once)."""
    storages: dict[int, int] = {}
    for states in groups:
        for state in states:
            for t in state.values():
                storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return {"held_tensors": len(storages), "held_tensor_bytes": sum(storages.values())}


def child(n_clients: int, method: str, per_round: int | None, out: Path) -> None:
    """Run one experiment in this (fresh) process and write its memory and time figures to `out`."""
    from unittest.mock import patch

    import torch

    import fedlora.api as api
    import fedlora.engines.inprocess as inprocess
    from fedlora.adapters.base_models import load_base_model
    from fedlora.core.tensors import num_bytes

    torch.set_num_threads(1)  # tiny model: one thread is fastest, and immune to a busy second core
    marks: dict[str, float] = {"rss_imported": live_rss()}
    def measured_session(*args, _original=inprocess.build_session, **kwargs):  # data split, model, tokenized data
        session = _original(*args, **kwargs)
        marks["rss_session"] = live_rss()
        return session

    def measured_report(run_dir, _original=api.write_report):  # the rounds are over: what the run holds now
        marks["peak_rss_training"] = peak_rss()
        marks["rss_live"] = live_rss()
        start = time.perf_counter()
        result = _original(run_dir)
        marks["report_s"] = time.perf_counter() - start
        return result

    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "synthetic.jsonl"
        synthetic_dataset(data, n_clients)
        rounds = 2 if per_round is None else 4
        cfg = {"name": "scale", "output_dir": f"{tmp}/run", "seed": 0, "model": {"name": "tiny-bert"},
               "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
               "data": {"dataset": str(data), "clients_per_task": n_clients, "partition": "iid",
                        "train_per_client": RECORDS_PER_CLIENT[0], "test_per_client": RECORDS_PER_CLIENT[1],
                        "max_length": 48},
               "training": {"lr": 1e-3, "local_steps": 1, "batch_size": 8},
               "federation": {"rounds": rounds, "eval_every": rounds, "eval_at_start": False,
                              "clients_per_round": per_round},
               "algorithm": {"name": method},
               "engine": {"progress": False, "checkpoint_every": 0, "torch_threads": 1}}
        start = time.perf_counter()
        with patch.object(inprocess, "build_session", measured_session), patch.object(api, "write_report", measured_report):
            result = api.run_experiment(cfg)
        wall = time.perf_counter() - start
        last = result.rounds[-1]
        fits = [r["fit_seconds"] for r in result.rounds if "fit_seconds" in r]  # training + aggregation, no evaluation
    report = {"clients": n_clients, "method": method, "clients_per_round": per_round, "rounds": rounds,
              "wall_s": wall, "fit_round_s": fits, "eval_s": last["seconds"] - fits[-1], **marks,
              "peak_rss": peak_rss(),
              "clients_with_state": sum(bool(s.states) for s in result.client_states.values()),
              "client_state_bytes": sum(num_bytes(s.states.values()) for s in result.client_states.values()),
              "server_state_bytes": num_bytes(result.server_state.get("tensors", {}).values()),
              **held_tensors([*(s.states.values() for s in result.client_states.values()),
                              result.server_state.get("tensors", {}).values()]),
              # what one per-client copy of the model would add
              "model_copy_bytes": sum(p.numel() * p.element_size()
                                      for p in load_base_model("tiny-bert", None, 4).model.parameters())}
    out.write_text(json.dumps(report))


def run_child(n_clients: int, method: str, per_round: int | None) -> dict:
    """One engine measurement in a fresh process, so that its peak RSS is its own."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "child.json"
        cmd = [sys.executable, __file__, "--child", str(n_clients), "--method", method, "--child-out", str(out)]
        if per_round:
            cmd += ["--per-round", str(per_round)]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"child {n_clients} {method} failed:\n{done.stderr[-3000:]}")
        return json.loads(out.read_text())


def slope(xs: list[float], ys: list[float]) -> float:
    """Least-squares slope of ys over xs."""
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)


def engine_benchmark(methods: list[str], sizes: list[int], per_round: int) -> dict:
    """Full-participation runs (memory, per-client cost) and sampled runs (per-round time) for every method and N."""
    out = {}
    for method in methods:
        full = [run_child(n, method, None) for n in sizes]
        sampled = [run_child(n, method, per_round) for n in sizes]
        for f, s in zip(full, sampled):
            print(f"  {method} N={f['clients']}: live RSS {f['rss_live'] / 1e6:.0f} MB, peak {f['peak_rss'] / 1e6:.0f} MB, "
                  f"{statistics.median(f['fit_round_s']) / f['clients'] * 1e3:.1f} ms per client fit, "
                  f"sampled round {statistics.median(s['fit_round_s']):.2f} s", flush=True)
        n = [float(f["clients"]) for f in full]
        per_client = lambda key: slope(n, [f[key] for f in full])  # noqa: E731
        out[method] = {"full": full, "sampled": sampled,
                       "bytes_per_client": {"live": per_client("rss_live"), "data": per_client("rss_session"),
                                            "rounds": per_client("rss_live") - per_client("rss_session"),
                                            "peak_training": per_client("peak_rss_training"),
                                            "peak_with_report": per_client("peak_rss")},
                       "adapter_state_bytes_per_client": per_client("held_tensor_bytes"),
                       "tensors_per_client": per_client("held_tensors"),
                       "model_copy_bytes": full[-1]["model_copy_bytes"]}
    return out


# -- (2) server: aggregate on N random replies --------------------------------------------------------------------

def random_loras(n: int, r: int, seed: int = 0) -> list[dict]:
    """N LoRA states of MiniLM's shapes; B around 4 centres, so that FedLEASE finds real clusters."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    centres = [{p: torch.randn(d_out, r, generator=gen) * 0.02 for p, _, d_out in MINILM_MODULES} for _ in range(4)]
    out = []
    for i in range(n):
        state = {}
        for p, d_in, d_out in MINILM_MODULES:
            state[f"{p}.lora_A"] = torch.randn(r, d_in, generator=gen) * 0.05
            state[f"{p}.lora_B"] = centres[i % 4][p] + torch.randn(d_out, r, generator=gen) * 0.005
        out.append(state)
    return out


def time_server(method: str, n: int, loras: list[dict], reps: int) -> dict:
    """Median seconds of `aggregate` and of the next round's `configure` for all N clients (fresh server each time)."""
    import torch

    from fedlora.adapters import AdapterSpec
    from fedlora.algorithms import ClientInfo, Reply, build

    spec = AdapterSpec(MINILM_MODULES, 8, 16.0)
    infos = [ClientInfo(f"c{i:04d}", 64 + i % 7, "t") for i in range(n)]
    ids = [c.client_id for c in infos]
    name, phase = method.split(":") if ":" in method else (method, "")
    options = {"warmup_rounds": 1} if name == "fedlease" else {}
    key = {"fedit": "global", "fedalt": "individual", "flora": "lora", "fedlease": "lora"}[name]
    agg, conf = [], []
    for _ in range(reps):
        server, _ = build(name, options, spec, 0)
        server.setup(infos, 10)
        replies = {cid: Reply({key: loras[i]}, infos[i].num_examples) for i, cid in enumerate(ids)}
        rnd = 1
        if phase == "clustered":  # allocation first (not timed), then a round of cluster experts and routers
            server.aggregate(1, replies)
            slots = 2 * len(server.experts) - 1
            gen = torch.Generator().manual_seed(1)
            router = {f"{p}.router": torch.randn(slots, d_in, generator=gen) * 0.05 for p, d_in, _ in MINILM_MODULES}
            replies = {cid: Reply({"expert": loras[i], "router": router}, infos[i].num_examples)
                       for i, cid in enumerate(ids)}
            rnd = 2
        start = time.perf_counter()
        server.aggregate(rnd, replies)
        agg.append(time.perf_counter() - start)
        start = time.perf_counter()
        server.configure(rnd + 1, ids)
        conf.append(time.perf_counter() - start)
    extra = {"n_experts": len(server.experts)} if name == "fedlease" else {}
    return {"aggregate_s": statistics.median(agg), "configure_s": statistics.median(conf),
            "total_s": statistics.median(a + c for a, c in zip(agg, conf)), **extra}


SERVER_METHODS = {"fedit": "FedIT: example-weighted mean of A and of B",
                  "fedalt": "FedALT: cache the Individual LoRAs, one running sum; configure = every client's RoW",
                  "fedlease": "FedLEASE allocation round: B-distance matrix, agglomerative clustering for "
                              "K=2..8, silhouette, cluster means",
                  "fedlease:clustered": "FedLEASE clustered round: per-cluster means of experts and routers",
                  "flora": "FLoRA: stack the weighted B column-wise and A row-wise"}


def server_benchmark(sizes: list[int], reps: int) -> dict:
    """Server time of every method at every N, and its fitted growth order."""
    import math

    import torch

    torch.set_num_threads(1)  # as the engine runs: the ratios between sizes, not the core count, are the point
    loras = random_loras(max(sizes), 8)
    out: dict = {}
    for method in SERVER_METHODS:
        rows = {}
        for n in sizes:
            rows[n] = time_server(method, n, loras[:n], reps if n < 1000 else max(1, reps - 2))
            print(f"  {method} N={n}: aggregate {rows[n]['aggregate_s'] * 1e3:.1f} ms, "
                  f"configure {rows[n]['configure_s'] * 1e3:.1f} ms", flush=True)
        logs = [math.log(n) for n in sizes]
        out[method] = {"by_clients": rows,
                       "growth_order": slope(logs, [math.log(rows[n]["total_s"]) for n in sizes]),
                       "growth_order_last": (math.log(rows[sizes[-1]]["total_s"]) - math.log(rows[sizes[-2]]["total_s"]))
                       / (logs[-1] - logs[-2])}
    return out


# -- output --------------------------------------------------------------------------------------------------------

def write_markdown(out: Path, data: dict) -> None:
    """scale.md: the engine table, bytes per client against the adapter state, and the server table."""
    eng, srv, sizes = data["engine"], data["server"], data["sizes"]
    mb = lambda b: f"{b / 1e6:.0f}"  # noqa: E731
    lines = ["# Scale: many clients on one machine", "",
             f"Command: `{data['command']}` ({data['elapsed_s'] / 60:.1f} min)", "",
             f"Machine: {data['machine']['cpus']} CPUs, {data['machine']['platform']}, torch {data['machine']['torch']}, "
             f"one torch thread; load average {data['machine']['load_average_start'][0]:.1f} at the start (shared with "
             "other work: absolute times are slow and noisy, memory is not affected).", "",
             "## (1) Engine: memory and time per round", "",
             "In-process engine, tiny random BERT (hidden 32, 2 layers), LoRA r=8 on query/value, synthetic data "
             f"({RECORDS_PER_CLIENT[0]} train + {RECORDS_PER_CLIENT[1]} test records per client), one local step "
             "(batch 8) per client and round. *Full*: every client trains in each of 2 rounds, so all N hold their "
             f"state; one fresh process per run. *Sampled*: {data['per_round']} clients per round, 4 rounds.", ""]
    for method, e in eng.items():
        per = {k: v / 1e3 for k, v in e["bytes_per_client"].items()}
        lines += [f"### {method}", "",
                  "| clients | with state | RSS after data MB | RSS after rounds MB | peak in rounds MB | peak with report MB "
                  "| adapter state MB | round s (all clients) | ms per client fit | evaluate all s | report s "
                  f"| round s ({data['per_round']} sampled) |", "|---|" + "---|" * 11]
        for f, s in zip(e["full"], e["sampled"]):
            fit = statistics.median(f["fit_round_s"])
            lines.append(f"| {f['clients']} | {f['clients_with_state']} | {mb(f['rss_session'])} | {mb(f['rss_live'])} | "
                         f"{mb(f['peak_rss_training'])} | {mb(f['peak_rss'])} | "
                         f"{f['held_tensor_bytes'] / 1e6:.2f} | {fit:.2f} | "
                         f"{1e3 * fit / f['clients']:.1f} | {f['eval_s']:.1f} | {f['report_s']:.1f} | "
                         f"{statistics.median(s['fit_round_s']):.2f} |")
        lines += ["", f"Memory per client (least-squares slope over N): **{per['live']:.1f} kB held after the rounds** "
                  f"= {per['data']:.1f} kB for the client's data (records, token ids) + {per['rounds']:.1f} kB added "
                  f"by the rounds; adapter state per client (its states incl. the private head, and the server's "
                  f"cache, which in process shares the client's tensors) **{e['adapter_state_bytes_per_client'] / 1e3:.1f}"
                  f" kB** in {e['tensors_per_client']:.0f} small tensors. Peak RSS grows by "
                  f"{per['peak_training']:.1f} kB per client during the rounds and {per['peak_with_report']:.1f} kB "
                  f"with the report. A per-client copy of the model would add {e['model_copy_bytes'] / 1e3:.0f} kB "
                  "per client here (MiniLM: ~90 MB).", ""]
    lines += ["RSS is measured after a garbage collection and `malloc_trim` (glibc otherwise keeps freed heap pages), "
              "so *after data* and *after rounds* are what the run really holds; *peak* is getrusage's maximum.", "",
              "## (2) Server: aggregation time as clients grow", "",
              f"Random replies of MiniLM's shapes (LoRA r=8 on query/value of 6 layers: "
              f"{data['lora_bytes'] / 1e3:.0f} kB per LoRA), the server's own `aggregate` plus the next round's "
              "`configure` for all N clients, median of repetitions, one thread.", "",
              "| method | " + " | ".join(f"N={n} ms" for n in sizes) + " | growth order (log-log slope) | last step |",
              "|---|" + "---|" * (len(sizes) + 2)]
    for method, s in srv.items():
        cells = " | ".join(f"{1e3 * s['by_clients'][n]['total_s']:.1f}" for n in sizes)
        lines.append(f"| {method} | {cells} | {s['growth_order']:.2f} | {s['growth_order_last']:.2f} |")
    lines += ["", "Split into aggregate / configure (ms):", ""]
    for method, s in srv.items():
        parts = ", ".join(f"N={n}: {1e3 * s['by_clients'][n]['aggregate_s']:.1f} / {1e3 * s['by_clients'][n]['configure_s']:.1f}"
                          for n in sizes)
        lines.append(f"* {method} ({SERVER_METHODS[method]}): {parts}")
    lines += ["", "Growth order 1 is linear in the number of replies; FedLEASE's allocation computes an N x N distance "
              "matrix and clusters it, so it tends to 2 (it runs once per run, at the end of the warm-up); every "
              "other server step is linear. Orders below 1 mean fixed costs still dominate at the small sizes.", ""]
    lines += NOTES + ["![scale](scale.png)"]
    (out / "scale.md").write_text("\n".join(lines) + "\n")


# Findings from investigating the numbers when this script was written (object counts, malloc_trim; not re-measured)
NOTES = [
    "## Findings", "",
    "* **What the bytes per client are.** No per-client model copy exists (one would be the model-copy figure "
    "above). Per client the run holds its data (records and token-id lists as Python objects, the *data* share), "
    "its adapter tensors, and small per-tensor costs: FedALT keeps 22 tensors per client (Individual LoRA, RoW, "
    "gate, head; the server's cache is the same tensor objects in process), each with ~0.7 kB of object and "
    "allocator overhead (a compact copy of all FedALT states measured 33 kB per client for 18 kB of values). "
    "The rest of the *rounds* share is the per-client round records (fit and evaluation metrics) and heap "
    "fragmentation (long-lived states allocated between freed training buffers). With a real model the adapter "
    "state dominates: one MiniLM LoRA (r=8, q/v) is 295 kB, a FedALT client's state ~0.6 MB, against this fixed "
    "~20-60 kB per client.",
    "* **The report is the largest per-client cost at 1,000 clients.** `write_report` draws the per-client bar "
    "chart 0.5 inch wide per client (a 500-inch figure at 1,000 clients): most of the *peak with report* growth "
    "(~0.2 MB per client) and of the report seconds. Proposed fix in `src/fedlora/reporting.py`: above ~50 "
    "clients draw the per-client metric as a sorted curve or a histogram on a fixed-size figure.",
    "* **FedALT's aggregate is O(all known clients) every round.** `_refresh_sum` re-adds every cached Individual "
    "LoRA after each round, so with 10 of 1,000 clients sampled it still touches all 1,000 (measured: 0.31 s for "
    "10 replies with 1,000 known clients at MiniLM's shapes, as much as all 1,000 replying). Updating the running sum by the replied clients only "
    "(S += w_k (new_k - old_k)) would make it O(replies); `configure`'s Rest-of-World per sampled client is "
    "O(|LoRA|) each, inherent.",
    "* **FedLEASE's allocation** is the only super-linear step (N x N B-distances, 7 agglomerative clusterings and "
    "silhouettes; local order ~1.5 from 100 to 1,000 replies, tending to 2), and it runs once per run. Orders of the "
    "linear steps scatter between runs on a shared machine (FLoRA's stacking, checked at 100 / 300 / 1,000 / 3,000 "
    "replies: 29 / 100 / 384 / 1,095 ms, order ~1.1).",
    "",
]


def write_plot(out: Path, data: dict) -> None:
    """scale.png: RSS against N, sampled round time against N, server time against N (log-log)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    eng, srv, sizes = data["engine"], data["server"], data["sizes"]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for method, e in eng.items():
        n = [f["clients"] for f in e["full"]]
        axes[0].plot(n, [f["rss_live"] / 1e6 for f in e["full"]], "o-", label=f"{method} after rounds")
        axes[0].plot(n, [f["peak_rss"] / 1e6 for f in e["full"]], "x--", label=f"{method} peak incl. report")
        axes[1].plot(n, [statistics.median(s["fit_round_s"]) for s in e["sampled"]], "o-",
                     label=f"{method}, {data['per_round']} per round")
    axes[0].set(xscale="log", xlabel="clients", ylabel="MB", title="memory (every client holds its state)")
    axes[1].set(xscale="log", xlabel="clients", ylabel="seconds", title="time per round", ylim=(0, None))
    for method, s in srv.items():
        axes[2].plot(sizes, [s["by_clients"][n]["total_s"] for n in sizes], "o-",
                     label=f"{method} (order {s['growth_order']:.2f})")
    axes[2].set(xscale="log", yscale="log", xlabel="replies", ylabel="seconds", title="server aggregate + configure")
    for ax in axes:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "scale.png", dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="10 and 100 clients, fewer repetitions (~2 minutes)")
    ap.add_argument("--methods", help="methods of the engine runs, comma-separated (default fedit,fedalt; --quick fedalt)")
    ap.add_argument("--out", type=Path, default=RESULTS, help="results directory (default benchmarks/results)")
    ap.add_argument("--child", type=int, help=argparse.SUPPRESS)  # internal: one engine run in a fresh process
    ap.add_argument("--method", help=argparse.SUPPRESS)
    ap.add_argument("--per-round", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--child-out", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child, args.method, args.per_round, args.child_out)
        return
    import torch

    started = time.perf_counter()
    sizes = [10, 100] if args.quick else [10, 100, 1000]
    machine = {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
               "load_average_start": list(os.getloadavg())}
    print("(1) engine", flush=True)
    methods = (args.methods or ("fedalt" if args.quick else "fedit,fedalt")).split(",")
    engine = engine_benchmark(methods, sizes, per_round=10)
    print("(2) server", flush=True)
    server = server_benchmark(sizes, reps=2 if args.quick else 5)
    machine["load_average_end"] = list(os.getloadavg())
    lora_bytes = sum(4 * 8 * (d_in + d_out) for _, d_in, d_out in MINILM_MODULES)
    data = {"command": "python benchmarks/scale.py " + " ".join(sys.argv[1:]), "machine": machine,
            "elapsed_s": time.perf_counter() - started, "sizes": sizes, "per_round": 10, "lora_bytes": lora_bytes,
            "engine": engine, "server": server}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "scale.json").write_text(json.dumps(data, indent=2))
    write_markdown(args.out, data)
    write_plot(args.out, data)
    print(f"wrote {args.out / 'scale.md'} ({data['elapsed_s']:.0f} s)")


if __name__ == "__main__":
    main()
