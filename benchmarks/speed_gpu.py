"""fedlora against a bare transformers + PEFT loop on one GPU, per client turn (issue #39 item 1).

speed.py's framework comparison (fedit, the same steps on the same batches, alternating repetitions) on CUDA, for
the MiniLM shape and the Qwen2.5-0.5B shape (random weights of the published configs, built as gpu.py builds them),
in bf16 (frozen base in bfloat16, autocast, fp32 LoRA and head) and in fp32 with TF32 off, with 1 client and with
16 clients one after another. The ratio is of the training rounds' wall time (so of the time per client turn),
against the goals: <= 1.10x for the decoder, <= 1.5x for MiniLM. Each row also counts, per step of one profiled
client turn on each side, aten operators, kernel launches, host-device synchronisations and copies. A last row
runs fedlora with `training.compile = true` against the eager bare loop (whatever compiling each run costs is in
its time: every run loads its model anew).
Rows run in order of value and are written as each finishes (speed-gpu.{md,json}), so a timeout loses only the rows
not reached; a row not started within --budget seconds is listed as not reached.
Without CUDA it prints so and exits 0; --dry-run runs tiny shapes on the CPU (checks the script, measures nothing).
Usage: python benchmarks/speed_gpu.py [--budget 170] [--out DIR] [--dry-run]
"""

from __future__ import annotations

from fedlora.core.offline import use_offline

use_offline()  # before transformers is imported

import argparse  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from gpu import SHAPES, TINY_SHAPES, build_model  # noqa: E402
from speed import framework_benchmark  # noqa: E402

RESULTS = Path(__file__).parent / "results"
GOALS = {"minilm-l6": 1.5, "qwen2.5-0.5b": 1.10, "tiny-bert": 1.5, "tiny-qwen": 1.10}
ROUNDS, STEPS, BATCH, LENGTH, REPS = 2, 4, 8, 128, 3
# (shape, precision, clients, training.compile), most valuable first: the decoder's 16-client bf16 turn is what
# users run; the compiled row last
ROWS = [("qwen2.5-0.5b", "bf16", 16, False), ("minilm-l6", "bf16", 16, False), ("qwen2.5-0.5b", "bf16", 1, False),
        ("minilm-l6", "bf16", 1, False), ("qwen2.5-0.5b", "fp32", 16, False), ("minilm-l6", "fp32", 16, False),
        ("qwen2.5-0.5b", "bf16", 16, True)]
DRY_ROWS = [("tiny-qwen", "bf16", 2, False), ("tiny-bert", "fp32", 1, False)]


def row(model_dir: str, shape: str, precision: str, clients: int, compile: bool, device: str, reps: int,
        steps: int) -> dict:
    """One comparison: both sides' time per client turn, the ratio, and the per-step counts."""
    out = framework_benchmark(model_dir, clients, ROUNDS, steps, reps, threads=torch.get_num_threads(), profile=True,
                              device=device, precision=precision, batch_size=BATCH, max_length=LENGTH, compile=compile)
    out.update(shape=shape, goal=GOALS[shape], met=out["ratio"]["wall"] <= GOALS[shape])
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    return out


def write(out: Path, report: dict) -> None:
    """speed-gpu.{json,md} (a dry run: speed-gpu-dry-run.*): the rows so far, with the goals and the counts."""
    out.mkdir(parents=True, exist_ok=True)
    stem = "speed-gpu-dry-run" if report["dry_run"] else "speed-gpu"
    (out / f"{stem}.json").write_text(json.dumps(report, indent=1))
    lines = ["# Speed on the GPU: fedlora against a bare transformers + PEFT loop", "",
             f"Device: {report['device']}; torch {report['torch']}. Command: `{report['command']}`.", "",
             f"FedIT, {ROUNDS} rounds x {report['steps']} local steps per client turn, batch {BATCH} x up to {LENGTH} "
             "tokens, LoRA r=8 on query/value (q_proj/v_proj) plus each client's head; random weights of the published "
             "shape. The bare side is speed.py's loop on `peft.get_peft_model` with everything on the device and no "
             "read-back inside its step loop. Ratio: median over alternating repetitions of fedlora's training-round "
             "wall time over the bare loop's (so per client turn). Counts: per step of one profiled client turn, "
             "fedlora / bare.", "",
             "| shape | precision | clients | fedlora s/turn | bare s/turn | ratio | goal | loss diff | launches | "
             "syncs | copies | aten ops |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in report["rows"]:
        setting = f"| {r['shape']} | {r['precision']}{' + compile' * bool(r.get('compile'))} | {r['clients']} |"
        if "error" in r or "skipped" in r:
            lines.append(f"{setting} {r.get('error') or r['skipped']} | | | | | | | | |")
            continue
        c = r["per_step_counts"]
        pair = lambda k: f"{c['fedlora'][k]:.1f} / {c['bare'][k]:.1f}"  # noqa: E731
        turn = r["median_s_per_turn"]
        lines.append(f"{setting} {turn['fedlora']:.4f} | {turn['bare']:.4f} | "
                     f"**{r['ratio']['wall']:.3f}x** | <= {r['goal']:.2f}x {'met' if r['met'] else '**missed**'} | "
                     f"{r['max_abs_train_loss_difference']:.1e} | {pair('kernel_launches')} | {pair('syncs')} | "
                     f"{pair('copies')} | {pair('aten_ops')} |")
    lines += ["", f"Elapsed: {report['elapsed_s']:.0f} s.", ""]
    (out / f"{stem}.md").write_text("\n".join(lines))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budget", type=float, default=170.0, help="no row starts after this many seconds")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--dry-run", action="store_true", help="tiny shapes on the CPU: checks the script, measures nothing")
    args = ap.parse_args()
    start = time.perf_counter()
    if not torch.cuda.is_available() and not args.dry_run:
        print("benchmarks/speed_gpu.py: no CUDA device here; nothing measured (run it on a GPU machine)")
        return
    device = "cpu" if args.dry_run else "cuda"
    rows, shapes = (DRY_ROWS, TINY_SHAPES) if args.dry_run else (ROWS, SHAPES)
    reps, steps = (1, 2) if args.dry_run else (REPS, STEPS)
    if args.dry_run:
        torch.set_num_threads(1)  # a busy small machine stalls with more (speed.py's note)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False  # fp32 rows: true fp32
    report = {"command": "python benchmarks/speed_gpu.py " + " ".join(sys.argv[1:]), "torch": torch.__version__,
              "device": torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu",
              "steps": steps, "dry_run": args.dry_run, "rows": [], "elapsed_s": 0.0}
    with tempfile.TemporaryDirectory() as tmp:
        models: dict[str, str] = {}
        for shape, precision, clients, compile in rows:
            entry = {"shape": shape, "precision": precision, "clients": clients, "compile": compile}
            if time.perf_counter() - start > args.budget:
                report["rows"].append({**entry, "skipped": f"not reached within --budget {args.budget:.0f} s"})
                continue
            try:
                if shape not in models:
                    models[shape] = build_model(shapes[shape], Path(tmp) / shape, device)
                report["rows"].append(row(models[shape], shape, precision, clients, compile, device, reps, steps))
            except Exception as exc:  # noqa: BLE001  (a row that fails, out of memory say, is a row that says so)
                report["rows"].append({**entry, "error": f"{type(exc).__name__}: {str(exc)[:200]}"})
            r = report["rows"][-1]
            print(f"{shape} {precision}{' compiled' * compile} x{clients}: " + (f"{r['ratio']['wall']:.3f}x" if "ratio" in r else
                                                         r.get("error", r.get("skipped", ""))), flush=True)
            report["elapsed_s"] = time.perf_counter() - start
            write(args.out, report)


if __name__ == "__main__":
    main()
