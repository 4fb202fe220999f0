"""fedlora on a CUDA GPU: CPU equality, bf16 and 4-bit cost per client turn, and the largest decoder whose round fits.

(a) fp32 on CUDA equals the CPU: one FedIT round of the tiny BERT on both, TF32 off; the largest absolute
    difference of the trained LoRA and of the evaluation loss (tolerance 1e-4).
(b) Per method (fedit, fedalt, fedlease, fdlora) and base (the MiniLM, Qwen2.5-0.5B and Llama-3.2-1B shapes,
    random weights built from the architecture's config: no download, and MiniLM need not travel: step time and
    memory do not depend on the weights' values), in bf16 and with a 4-bit nf4 base: seconds per client turn
    (one local round of `STEPS` steps, batch 8 x `LENGTH` tokens) and the round's peak GPU memory; rows not
    reached within half of `--budget` are marked so, leaving (c) its time.
(c) The largest Llama-shaped decoder (1B, 3B, 8B) whose FedIT round fits, in bf16 and in 4-bit, within the time
    left of `--budget` seconds.
Without CUDA it prints so and measures nothing (exit 0); `--dry-run` runs (b) and (c) on the CPU with tiny shapes,
to check the script itself. Results: benchmarks/results/gpu.{md,json}.
Usage: python benchmarks/gpu.py [--budget 420] [--methods fedit ...] [--out DIR] [--dry-run]
"""

from __future__ import annotations

from fedlora.core.offline import use_offline

use_offline()  # before transformers is imported

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

RESULTS = Path(__file__).parent / "results"
METHODS = {"fedit": {}, "fedalt": {}, "fedlease": {"warmup_rounds": 1}, "fdlora": {"stage1_rounds": 1}}
STEPS, LENGTH = 4, 128
# (kind, hidden, intermediate, layers, heads, kv heads, vocab): the published configs' shapes
SHAPES = {"minilm-l6": ("bert", 384, 1536, 6, 12, 12, 30522),
          "qwen2.5-0.5b": ("qwen2", 896, 4864, 24, 14, 2, 151936),
          "llama-3.2-1b": ("llama", 2048, 8192, 16, 32, 8, 128256),
          "llama-3.2-3b": ("llama", 3072, 8192, 28, 24, 8, 128256),
          "llama-3.1-8b": ("llama", 4096, 14336, 32, 32, 8, 128256)}
TINY_SHAPES = {"tiny-bert": ("bert", 64, 128, 2, 2, 2, 512), "tiny-qwen": ("qwen2", 64, 128, 2, 2, 1, 512),
               "tiny-llama": ("llama", 64, 128, 2, 2, 1, 512)}
TURN_SHAPES, LARGEST_SHAPES = 3, 3  # (b) the first three shapes, (c) the last three (llama 1B, 3B, 8B)


def build_model(shape: tuple, out: Path, device: str) -> str:
    """A sequence-classification model of that shape (an encoder or a decoder) with random weights, saved (bf16)
    with a byte tokenizer."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    from fedlora.adapters.base_models import byte_tokenizer

    kind, hidden, inter, layers, heads, kv, vocab = shape
    config = AutoConfig.for_model(kind, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                                  num_attention_heads=heads, num_key_value_heads=kv, vocab_size=vocab,
                                  max_position_embeddings=2048, num_labels=2, pad_token_id=0, tie_word_embeddings=False)
    with torch.device(device):  # random init on the GPU: seconds, where the CPU needs minutes for 8B
        model = AutoModelForSequenceClassification.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(out)
    byte_tokenizer().save_pretrained(out)
    del model
    return str(out)


def config(model: str, method: str, out: str, device: str, precision: str, quantization: str, clients: int = 2) -> dict:
    """One short run: `clients` clients, 2 rounds (so FedLEASE and FDLoRA reach their second phase)."""
    return {"name": "gpu", "output_dir": out, "seed": 0,
            "model": {"name": model, "device": device, "quantization": quantization,
                      "dtype": "float32" if precision == "fp32" else "bfloat16"},
            "lora": {"r": 8, "alpha": 16, "dropout": 0.05},
            "data": {"dataset": "wordnet-demo", "tasks": ["noun_topic", "verb_class"][:clients],
                     "clients_per_task": max(1, clients // 2), "train_per_client": 48, "test_per_client": 16,
                     "max_length": LENGTH},
            "training": {"lr": 5e-4, "local_steps": STEPS, "batch_size": 8, "eval_batch_size": 16,
                         "precision": precision},
            "federation": {"rounds": 2, "eval_every": 2, "eval_at_start": False},
            "algorithm": {"name": method, "options": METHODS.get(method, {})},
            "engine": {"progress": False, "checkpoint_every": 0}}


def turn_cost(cfg: dict) -> dict:
    """Seconds per client turn (round 2's fit, no evaluation) and the peak GPU memory of the run's rounds."""
    from fedlora import run_experiment

    result = run_experiment(cfg)
    # a round's configure .. aggregate (no evaluation), per sampled client
    fit_seconds = [r["fit_seconds"] / max(len(r["sampled"]), 1) for r in result.rounds if "fit_seconds" in r]
    peaks = [r["peak_device_memory"] for r in result.rounds if "peak_device_memory" in r]
    return {"seconds_per_turn": fit_seconds[-1], "peak_gib": max(peaks) / 2**30 if peaks else None,
            "accuracy": result.rounds[-1]["summary"]["mean"].get("accuracy")}


def cuda_equals_cpu(tmp: Path) -> dict:
    """(a): one FedIT round of the tiny BERT in fp32 on the CPU and on CUDA."""
    from fedlora import run_experiment

    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    runs = {}
    for device in ("cpu", "cuda"):
        cfg = config("tiny-bert", "fedit", str(tmp / f"eq-{device}"), device, "fp32", "none")
        cfg["federation"] = {"rounds": 1, "eval_at_start": True}
        runs[device] = run_experiment(cfg)
    diffs = [float((a - runs["cuda"].client_states[cid].states["global"][k]).abs().max())
             for cid, s in runs["cpu"].client_states.items() for k, a in s.states.get("global", {}).items()]
    if not diffs:  # fedit keeps no global state per client: compare the server's
        glob = runs["cpu"].server_state["tensors"]["global"]
        diffs = [float((v - runs["cuda"].server_state["tensors"]["global"][k]).abs().max()) for k, v in glob.items()]
    loss = [abs(runs["cpu"].final[c]["loss"] - runs["cuda"].final[c]["loss"]) for c in runs["cpu"].final]
    before = [runs[d].rounds[0]["eval"] for d in ("cpu", "cuda")]
    forward = [abs(before[0][c]["loss"] - before[1][c]["loss"]) for c in before[0]]
    # the untrained forward must agree to float rounding; after training, AdamW divides each gradient by its own
    # running scale, so a near-zero gradient (LoRA A's, while B is still ~0) whose sign differs between the two
    # devices' rounding moves by ~lr either way: the trained LoRA may then differ by a few lr
    return {"max_forward_loss_diff": max(forward), "max_lora_diff": max(diffs), "max_loss_diff": max(loss),
            "lr": cfg["training"]["lr"], "tolerance": 1e-4}


def sgd_step_difference(devices: tuple[str, ...] = ("cpu", "cuda")) -> dict:
    """One SGD step (no AdamW: its per-coordinate normalisation turns a rounding-sized gradient into an lr-sized
    step) of the tiny BERT's LoRA and head on one fixed batch, fp32 on each device: how far the kernels' rounding
    alone moves the result. The tolerance a CPU-vs-CUDA comparison can promise is this, not AdamW's."""
    from fedlora.adapters import AdaptedModel
    from fedlora.adapters.base_models import load_base_model
    from fedlora.core.seeding import generator
    from fedlora.data.tokenize import collate, encode_classification

    results = {}
    for device in devices:
        base = load_base_model("tiny-bert", None, 3, seed=0)
        adapted = AdaptedModel(base.model, r=4, alpha=8, dropout=0.0)
        init = adapted.spec.init_lora(generator(0, "lora-init"))
        noise = generator(0, "sgd-check")  # a non-zero B, so that A's gradient is not zero too
        adapted.load_expert(0, {k: torch.randn(v.shape, generator=noise) * 0.05 if k.endswith("lora_B") else v
                                for k, v in init.items()})
        adapted.model.to(device)
        adapted.set_trainable([0], head=True)
        records = [{"text": f"an example sentence number {i} " * (1 + i % 4), "label": str(i % 3)} for i in range(16)]
        batch = collate(encode_classification(records, base.tokenizer, ["0", "1", "2"], 64), list(range(16)),
                        base.tokenizer.pad_token_id)
        batch = {k: v.to(device) for k, v in batch.items()}
        params = adapted.trainable_parameters()
        optimizer = torch.optim.SGD(params, lr=0.1)
        adapted.model.train()
        logits = adapted.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        loss = torch.nn.functional.cross_entropy(logits[:, :3].float(), batch["labels"])
        loss.backward()
        grads = torch.cat([p.grad.flatten().cpu() for p in params])
        optimizer.step()
        results[device] = {"loss": float(loss.detach()), "grad": grads,
                           "params": torch.cat([p.detach().flatten().cpu() for p in params])}
    cpu, other = results[devices[0]], results[devices[-1]]
    grad_scale = float(cpu["grad"].abs().max())
    return {"loss_diff": abs(cpu["loss"] - other["loss"]),
            "max_grad_diff": float((cpu["grad"] - other["grad"]).abs().max()), "max_grad": grad_scale,
            "max_param_diff_after_step": float((cpu["params"] - other["params"]).abs().max()), "lr": 0.1}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budget", type=float, default=420.0, help="seconds for the whole script (it must fit in 8 min)")
    ap.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS))
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--dry-run", action="store_true", help="tiny shapes on the CPU: checks the script, measures nothing")
    args = ap.parse_args()
    start = time.perf_counter()
    if not torch.cuda.is_available() and not args.dry_run:
        print("benchmarks/gpu.py: no CUDA device here; nothing measured (run it on a GPU machine)")
        return
    device = "cuda" if not args.dry_run else "cpu"
    shapes = TINY_SHAPES if args.dry_run else SHAPES
    precisions = [("bf16", "none"), ("bf16", "4bit")]
    report: dict = {"command": "python benchmarks/gpu.py " + " ".join(sys.argv[1:]), "torch": torch.__version__,
                    "device": torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu",
                    "steps": STEPS, "length": LENGTH, "turns": [], "largest": []}
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        if device == "cuda":
            report["cuda_equals_cpu"] = cuda_equals_cpu(tmp)
            print("cuda = cpu:", report["cuda_equals_cpu"], flush=True)
            report["sgd_step"] = sgd_step_difference()
            print("one SGD step, cpu against cuda:", report["sgd_step"], flush=True)
        models: dict[str, str] = {}

        def model_dir(name: str) -> str:  # each shape built once, at its first row
            if name not in models:
                models[name] = build_model(shapes[name], tmp / name, device)
            return models[name]

        for precision, quant in precisions:  # every bf16 row before any 4-bit one: a CUDA error ends the rest
            for name in list(shapes)[:TURN_SHAPES]:
                model = model_dir(name)
                for method in args.methods:
                    row = {"model": name, "precision": precision, "quantization": quant, "method": method}
                    if time.perf_counter() - start > args.budget * 0.5:
                        row["error"] = "skipped: out of time"
                        report["turns"].append(row)
                        continue
                    try:
                        row.update(turn_cost(config(model, method, str(tmp / f"{name}-{method}-{quant}"), device,
                                                    precision, quant)))
                    except Exception as exc:  # an OOM or a missing bitsandbytes is a result, not a crash
                        row["error"] = f"{type(exc).__name__}: {str(exc)[:160]}"
                    report["turns"].append(row)
                    print(row, flush=True)
                    _write(report, args.out, args.dry_run)
        for precision, quant in precisions:
            for name in list(shapes)[-LARGEST_SHAPES:] if not args.dry_run else list(shapes)[-1:]:
                if time.perf_counter() - start > args.budget * 0.8:
                    report["largest"].append({"model": name, "quantization": quant, "skipped": "out of time"})
                    continue
                model = model_dir(name)
                row = {"model": name, "precision": precision, "quantization": quant}
                try:
                    row.update(turn_cost(config(model, "fedit", str(tmp / f"big-{name}-{quant}"), device, precision,
                                                quant)))
                except Exception as exc:
                    row["error"] = f"{type(exc).__name__}: {str(exc)[:160]}"
                report["largest"].append(row)
                print(row, flush=True)
                _write(report, args.out, args.dry_run)
    report["seconds"] = time.perf_counter() - start
    _write(report, args.out, args.dry_run)


def _write(report: dict, out: Path, dry_run: bool) -> None:
    """gpu.md + gpu.json (gpu_dry_run.* for a CPU check of the script)."""
    out.mkdir(parents=True, exist_ok=True)
    stem = "gpu_dry_run" if dry_run else "gpu"
    (out / f"{stem}.json").write_text(json.dumps(report, indent=1))
    lines = [f"# fedlora on {report['device']}{' (dry run on the CPU: tiny shapes, nothing measured)' if dry_run else ''}",
             "", f"torch {report['torch']}; {report['steps']} local steps of batch 8 x {report['length']} tokens per "
             "client turn; LoRA r=8 on the architecture's default targets (PEFT's mapping: query/value, "
             "q_proj/v_proj); random weights of the published shapes.", ""]
    if "cuda_equals_cpu" in report:
        eq = report["cuda_equals_cpu"]
        lines += [f"fp32 CUDA vs CPU (TF32 off): untrained forward max |loss diff| "
                  f"{eq.get('max_forward_loss_diff', float('nan')):.2e} (tolerance {eq['tolerance']:g}); after one "
                  f"FedIT round (AdamW, lr {eq.get('lr', float('nan')):g}) max |LoRA diff| {eq['max_lora_diff']:.2e}, "
                  f"max |loss diff| {eq['max_loss_diff']:.2e}", ""]
    if "sgd_step" in report:
        s = report["sgd_step"]
        lines += [f"One SGD step (lr {s['lr']:g}) of the tiny BERT's LoRA and head on one batch, fp32, CPU vs CUDA: loss "
                  f"diff {s['loss_diff']:.2e}, max |gradient diff| {s['max_grad_diff']:.2e} (largest gradient "
                  f"{s['max_grad']:.2e}), max |parameter diff| after the step {s['max_param_diff_after_step']:.2e}: the "
                  "kernels' rounding alone; what an AdamW round adds to it is the optimizer's sign amplification.", ""]
    lines += ["| model | base | method | s / client turn | peak GiB | note |", "|---|---|---|---|---|---|"]
    for r in report["turns"]:
        base = "4-bit nf4" if r["quantization"] == "4bit" else r["precision"]
        peak = f"{r['peak_gib']:.2f}" if r.get("peak_gib") is not None else "-"
        secs = f"{r['seconds_per_turn']:.3f}" if "seconds_per_turn" in r else "-"
        lines.append(f"| {r['model']} | {base} | {r['method']} | {secs} | {peak} | {r.get('error', '')} |")
    lines += ["", "Largest decoder whose FedIT round fits:", "", "| model | base | s / client turn | peak GiB | note |",
              "|---|---|---|---|---|"]
    for r in report["largest"]:
        base = "4-bit nf4" if r["quantization"] == "4bit" else r.get("precision", "")
        peak = f"{r['peak_gib']:.2f}" if r.get("peak_gib") is not None else "-"
        secs = f"{r['seconds_per_turn']:.3f}" if "seconds_per_turn" in r else "-"
        lines.append(f"| {r['model']} | {base} | {secs} | {peak} | {r.get('error', r.get('skipped', ''))} |")
    lines += ["", f"Command: `{report['command']}`", ""]
    (out / f"{stem}.md").write_text("\n".join(lines))


if __name__ == "__main__":
    main()
