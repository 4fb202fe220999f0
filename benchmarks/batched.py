"""Client-steps per second with K clients trained together (engine.client_batch = K) against one after another.

For each model and K, one FedIT round of K clients (`STEPS` local steps each, batch 8 x up to `LENGTH` tokens,
LoRA r 8 on the architecture's default targets, dropout 0.05) is trained both ways on the same session: sequential
(`ClientRuntime.fit` per client) and batched (`ClientRuntime.fit_together`), the two taking turns repetition by
repetition (this machine's speed drifts) after one warm-up each; the median of each is reported with the ratio.
Models: MiniLM (all-MiniLM-L6-v2, sequence classification) and a decoder built from its architecture's config with
random weights (gpu.py's shapes: Qwen2.5-0.5B on a GPU; on the CPU a 4-layer, hidden-256 Qwen2 so that a run
takes minutes). On CUDA it runs in bf16 (the goal: >= 5x for 16 MiniLM clients, >= 3x for 16 decoder clients),
and the batched round is also timed with the clients' LoRA in a loop over clients (`engine.grouped_lora = false`)
against the grouped matrix products it uses there by default. On the CPU each row also counts the operators one
client-step dispatches (sequential, batched, batched with grouped products): a GPU round of many small clients is
bound by kernel launches, so the count tells on any machine what a GPU's step time follows.
Results: benchmarks/results/batched.{md,json,png} on a CPU, batched-gpu.{md,json,png} on CUDA (so one device's run
never replaces the other's), rewritten after every row so a run cut short keeps what it measured; a K whose
batched round does not fit the GPU's memory is a row that says so.
Usage: python benchmarks/batched.py [--quick] [--ks 1 4 16 64] [--reps 3] [--minilm-shape] [--out DIR]
"""

from __future__ import annotations

from fedlora.core.offline import use_offline

use_offline()  # before transformers is imported

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from gpu import SHAPES, build_model  # noqa: E402

RESULTS = Path(__file__).parent / "results"
STEPS, LENGTH, BATCH = 3, 64, 8
CPU_DECODER = ("qwen2", 256, 1024, 4, 4, 2, 512)


def session(model: str, clients: int, device: str, precision: str, tmp: str, grouped: bool | None = None):
    """A FedIT session of `clients` clients on the WordNet sample (iid), set up for round 1."""
    from fedlora.core.config import build_config
    from fedlora.engines.session import build_session

    cfg = build_config({"name": "batched", "output_dir": tmp, "seed": 0,
                        "model": {"name": model, "device": device,
                                  "dtype": "bfloat16" if precision == "bf16" else "float32"},
                        "lora": {"r": 8, "alpha": 16, "dropout": 0.05},
                        "data": {"dataset": "wordnet-demo", "tasks": ["noun_topic"], "partition": "iid",
                                 "clients_per_task": clients, "train_per_client": 24, "test_per_client": 2,
                                 "max_length": LENGTH},
                        "training": {"lr": 5e-4, "local_steps": STEPS, "batch_size": BATCH, "precision": precision},
                        "algorithm": {"name": "fedit"},
                        "engine": {"progress": False, "client_batch": clients, "grouped_lora": grouped}})
    s = build_session(cfg)
    s.server.setup(s.infos)
    return s


def measure(model: str, k: int, device: str, precision: str, reps: int, tmp: str) -> dict:
    """Median seconds of a K-client round, sequential and batched, and client-steps per second of each."""
    from fedlora.algorithms import ClientState

    s = session(model, k, device, precision, tmp)
    ids = [i.client_id for i in s.infos]
    payloads = s.server.configure(1, ids)
    turns = [(cid, 1, payloads[cid], ClientState()) for cid in ids]

    def sequential() -> None:
        for turn in turns:
            s.runtime.fit(*turn)

    last: dict[str, list] = {}

    def together(runtime, name: str = "batched") -> None:
        outcomes = runtime.fit_together(turns)
        for outcome in outcomes:
            if isinstance(outcome, Exception):
                raise outcome
        last[name] = [reply for reply, _ in outcomes]

    variants = {"sequential": sequential, "batched": lambda: together(s.runtime)}
    if device.startswith("cuda") and k > 1:  # the same batched round with the LoRA part in a loop over clients
        looped = session(model, k, device, precision, tmp + "-loop", grouped=False)
        variants["batched_loop"] = lambda: together(looped.runtime, "batched_loop")
    times: dict[str, list[float]] = {name: [] for name in variants}
    for rep in range(reps + 1):  # the first of each is a warm-up
        for name, fn in variants.items():
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            start = time.perf_counter()
            fn()
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            if rep:
                times[name].append(time.perf_counter() - start)
    ops = {}
    if device == "cpu":  # (on CUDA the backward's operators are not seen: see OpCount)
        grouped = session(model, k, device, precision, tmp + "-grouped", grouped=True)  # as on CUDA
        counted = {**variants, "grouped": lambda: together(grouped.runtime, "grouped")}
        ops = {name: count_ops(fn) / (k * STEPS) for name, fn in counted.items()}
    seq, bat = statistics.median(times["sequential"]), statistics.median(times["batched"])
    # a joint step that fails (out of memory) is redone client by client: then "batched" was not batched
    retried = s.runtime._batch.retried_alone if s.runtime._batch is not None else 0
    row = {"joint_steps_retried_alone": retried, "model": model, "clients": k, "sequential_s": seq, "batched_s": bat,
           "sequential_steps_per_s": k * STEPS / seq, "batched_steps_per_s": k * STEPS / bat, "speedup": seq / bat,
           **{f"{name}_ops_per_client_step": n for name, n in ops.items()}}
    if "batched_loop" in times:  # the same round both ways: the grouped products must give the loop's adapters
        row["batched_loop_s"] = statistics.median(times["batched_loop"])
        row["grouped_vs_loop_max_diff"] = max(
            float((a.float() - b.float()).abs().max())
            for x, y in zip(last["batched"], last["batched_loop"]) for name in x.states
            for a, b in zip(x.states[name].values(), y.states[name].values()))
    return row


class OpCount(TorchDispatchMode):
    """Counts the operators that do work (views excluded): on a GPU each is a kernel launch or more, and a round
    of many small clients is bound by those launches, not by arithmetic, so the count says on any device what a
    GPU's step time will follow. Dispatch modes are per thread: on CUDA the backward runs on autograd's device
    thread and is not counted, on the CPU it is."""

    def __init__(self) -> None:
        super().__init__()
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += not func.is_view
        return func(*args, **(kwargs or {}))


def count_ops(fn: Callable[[], None]) -> int:
    """Operators dispatched by one call of fn (see OpCount)."""
    with OpCount() as counter:
        fn()
    return counter.ops


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="K in {1, 4, 16} only, 2 repetitions")
    parser.add_argument("--ks", type=int, nargs="+", help="the numbers of clients K (default 1 4 16 64)")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--minilm-shape", action="store_true",
                        help="MiniLM's shape with random weights (step times do not depend on them; nothing to carry)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    device, precision = ("cuda", "bf16") if cuda else ("cpu", "fp32")
    torch.set_num_threads(torch.get_num_threads())
    ks = args.ks or ([1, 4, 16] if args.quick else [1, 4, 16, 64])
    reps = 2 if args.quick else args.reps
    rows: list[dict] = []
    report = {"device": torch.cuda.get_device_name(0) if cuda else platform.processor() or "cpu",
              "precision": precision, "torch_threads": torch.get_num_threads(), "steps": STEPS, "batch": BATCH,
              "length": LENGTH, "rows": rows, "command": "python benchmarks/batched.py " + " ".join(sys.argv[1:])}
    stem = "batched-gpu" if cuda else "batched"
    with tempfile.TemporaryDirectory() as tmp:
        decoder_shape = SHAPES["qwen2.5-0.5b"] if cuda else CPU_DECODER
        decoder = build_model(decoder_shape, Path(tmp) / "decoder", device)
        # the CPU decoder is small so that a run takes minutes; K=64 of it adds nothing MiniLM's row does not show
        minilm = build_model(SHAPES["minilm-l6"], Path(tmp) / "minilm", device) if args.minilm_shape else "minilm"
        models = {minilm: ks, decoder: [k for k in ks if cuda or k <= 16]}
        for model, model_ks in models.items():
            name = ("minilm" + " shape" * args.minilm_shape if model == minilm else
                    "qwen2.5-0.5b shape" if cuda else "qwen2 4 layers x 256 (CPU)")
            for k in model_ks:
                try:
                    row = measure(model, k, device, precision, reps, str(Path(tmp) / f"run-{len(rows)}"))
                except torch.OutOfMemoryError:  # even one client alone did not fit
                    rows.append({"model": name, "clients": k, "out_of_memory": True})
                    print(f"{name:>28}  K={k:<3} out of GPU memory", flush=True)
                    torch.cuda.empty_cache()
                    write(report, args.out, stem)
                    continue
                row["model"] = name
                rows.append(row)
                print(f"{name:>28}  K={k:<3} sequential {row['sequential_s']:7.2f} s  batched "
                      f"{row['batched_s']:7.2f} s  speed-up {row['speedup']:.2f}x", flush=True)
                write(report, args.out, stem)


def write(report: dict, out: Path, stem: str = "batched") -> None:
    """<stem>.json, <stem>.md (the table) and <stem>.png (client-steps per second against K)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = ["# Clients trained together (engine.client_batch)\n",
             f"`{report['command']}` on {report['device']}, {report['precision']}, {report['torch_threads']} torch "
             f"threads; FedIT, {report['steps']} local steps per client, batch {report['batch']} x up to "
             f"{report['length']} tokens, LoRA r 8. A K-client round, sequential against batched on the same session, "
             "alternating, median of the repetitions.\n",
             "Operators per client-step (counted on the CPU): the operators (views excluded) one client's step "
             "dispatches, backward included, sequential, batched, and batched with the LoRA in grouped products as "
             "on CUDA; on a GPU each is a kernel launch or more, and a round of many small clients is bound by "
             "launches.\n",
             "| model | K | sequential (s) | batched (s) | client-steps/s sequential | batched | speed-up "
             "| operators per client-step sequential | batched | grouped |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in report["rows"]:
        if r.get("out_of_memory"):
            lines.append(f"| {r['model']} | {r['clients']} | out of memory | | | | | | | |")
            continue
        retried = (f" ({r['joint_steps_retried_alone']} joint steps failed, out of memory?, and ran client by "
                   "client)") if r.get("joint_steps_retried_alone") else ""
        lines.append(f"| {r['model']} | {r['clients']} | {r['sequential_s']:.2f} | {r['batched_s']:.2f} | "
                     f"{r['sequential_steps_per_s']:.1f} | {r['batched_steps_per_s']:.1f} | {r['speedup']:.2f}x"
                     f"{retried} | {_ops(r, 'sequential')} | {_ops(r, 'batched')} | {_ops(r, 'grouped')} |")
    looped = [r for r in report["rows"] if "batched_loop_s" in r]
    if looped:
        lines += ["", "The batched round with the clients' LoRA in grouped matrix products (the CUDA default) "
                  "against a loop over clients (`engine.grouped_lora = false`), and the largest difference "
                  "between the two rounds' adapters:", "",
                  "| model | K | grouped (s) | loop (s) | grouped speed-up | adapters' largest difference |",
                  "|---|---|---|---|---|---|"]
        lines += [f"| {r['model']} | {r['clients']} | {r['batched_s']:.2f} | {r['batched_loop_s']:.2f} | "
                  f"{r['batched_loop_s'] / r['batched_s']:.2f}x | {r['grouped_vs_loop_max_diff']:.1e} |"
                  for r in looped]
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for model in dict.fromkeys(r["model"] for r in report["rows"]):
        rows = [r for r in report["rows"] if r["model"] == model and not r.get("out_of_memory")]
        ks = [r["clients"] for r in rows]
        ax.plot(ks, [r["sequential_steps_per_s"] for r in rows], "o--", label=f"{model}, sequential")
        ax.plot(ks, [r["batched_steps_per_s"] for r in rows], "o-", label=f"{model}, batched")
    ax.set(xscale="log", xlabel="clients K", ylabel="client-steps per second", title=f"{report['device']}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / f"{stem}.png", dpi=120)
    plt.close(fig)


def _ops(row: dict, variant: str) -> str:
    value = row.get(f"{variant}_ops_per_client_step")
    return f"{value:.0f}" if value is not None else "-"


if __name__ == "__main__":
    main()
