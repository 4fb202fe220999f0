"""What an export directory holds besides its adapters, and how it is written: the staged swap that replaces an
earlier export whole, the README with the exact loading lines, the base model saved for PEFT, the client's head.

`serving.py` writes exports with these; node-side exports (engines/nodestate.py) use the same ones.
"""

from __future__ import annotations

import copy
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from .adapters import AdaptedModel
from .core.errors import ConfigError
from .core.io import umask
from .core.tensors import StateDict

MANIFEST = "fedlora_personalized.json"
# every name an export writes: only a directory holding nothing else may be replaced by an export
EXPORT_ENTRY = re.compile(r"fedlora_personalized\.json|README\.md|expert_\d+|base|router\.safetensors|"
                          r"base_delta\.safetensors|hook\.safetensors")
INPUT_DEPENDENT = {"dense": "a softmax gate per token (FedALT's adaptive mixer)",
                   "adaptive_top_m": "a top-M router per token (FedLEASE)",
                   "hook": "instance-wise weights computed per input from reference examples (FedDPA)"}


def check_replaceable(out: Path) -> None:
    """ConfigError unless `out` is absent, empty, or holds only what an export writes (an earlier export)."""
    if not out.exists():
        return
    if not out.is_dir():
        raise ConfigError(f"export directory {out} is a file; give a new directory or an earlier export")
    foreign = sorted(p.name for p in out.iterdir() if not EXPORT_ENTRY.fullmatch(p.name))
    if foreign:
        raise ConfigError(f"{out} is not empty and not a fedlora export (it holds {', '.join(foreign[:3])}"
                          f"{' ...' if len(foreign) > 3 else ''}); give a new or empty directory, or an earlier "
                          "export to replace")


@contextmanager
def staged_directory(out: Path) -> Iterator[Path]:
    """A fresh directory next to `out`, swapped in for `out` when the block succeeds (removed when it fails), so
    nothing of an earlier export survives and a failed export leaves the earlier one intact."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.export-"))
    try:
        yield tmp
        normalize_modes(tmp)
        check_replaceable(out)  # again: something may have been written there meanwhile
        old = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.old-")) if out.exists() else None
        if old is not None:
            os.replace(out, old)  # replaces the empty placeholder directory
        os.replace(tmp, out)
        if old is not None:
            shutil.rmtree(old)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def normalize_modes(root: Path) -> None:
    """Give every file 0666 and every directory 0777 less the umask: mkdtemp and some writers use 0600/0700."""
    mask = umask()
    os.chmod(root, 0o777 & ~mask)
    for path in root.rglob("*"):
        os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~mask)


def client_head(adapted: AdaptedModel, head: StateDict, n_labels: int, head_outputs: int) -> tuple[StateDict, int]:
    """(the head cut to the client's own labels, its number of outputs): the output rows of its final linear
    layer (the shared model's head has one row per label of the largest task; fedlora never reads the rest)."""
    if not head:
        return {}, 0
    out: StateDict = {}
    for name, value in head.items():
        module = adapted.model.get_submodule(name.rsplit(".", 1)[0])
        is_output = isinstance(module, torch.nn.Linear) and module.out_features == head_outputs
        out[name] = value[:n_labels].clone() if is_output else value
    cut = any(out[n].shape != head[n].shape for n in head)
    return out, n_labels if cut else head_outputs


def label_names(labels: list[str], n: int) -> list[str]:
    """The names of a head's n outputs: the client's labels, then placeholders for outputs it does not use."""
    return labels + [f"unused_{i}" for i in range(len(labels), n)]


def save_base_model(adapted: AdaptedModel, tokenizer: object, out: Path, head: StateDict, labels: list[str]) -> None:
    """Save the base model as it is in `adapted` (without the LoRA layers, with the client's head and one label
    name per head output) and its tokenizer with save_pretrained: transformers then loads it with the right
    num_labels/id2label from `out` alone."""
    model = adapted.model
    config = copy.deepcopy(model.config)
    if head:
        config.id2label = dict(enumerate(labels))  # sets num_labels too
        config.label2id = {name: i for i, name in enumerate(labels)}
    with torch.random.fork_rng(devices=[]):  # the throwaway init must not move anyone's random stream
        fresh = type(model)(config).to(next(model.parameters()).dtype)
    state = plain_base_state(adapted)
    state.update(head)
    fresh.load_state_dict(state, strict=True)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a bar per shard would interleave with fedlora's own output
    try:
        fresh.save_pretrained(out)
    finally:
        hf_logging.enable_progress_bar()
    tokenizer.save_pretrained(out)


def plain_base_state(adapted: AdaptedModel) -> StateDict:
    """The HF model's own state dict from `adapted`: each injected layer's `base.` weights under the layer's name,
    its LoRA experts and router left out."""
    state: StateDict = {}
    for key, value in adapted.model.state_dict().items():
        path = next((p for p in adapted.layers if key.startswith(p + ".")), None)
        if path is None:
            state[key] = value
        elif key.startswith(f"{path}.base."):
            state[path + key[len(path) + len(".base"):]] = value
    return state


def export_readme(m: dict, out: Path) -> str:
    """The export's README.md: what it holds and the exact lines that load it (plain PEFT when that is exact)."""
    where = str(out.resolve())
    peft_info = m["peft"]
    lines = [f"# Client {m['client_id']}'s personalized model ({m['method']}, round {m['round']})", "",
             "Written by `fedlora export`; see fedlora's docs/models.md.", "",
             "## With fedlora (always the model fedlora evaluated)", "", "```python", "import fedlora", "",
             f"model = fedlora.load_personalized({where!r})", "print(model.predict([\"some text\"]))", "```", ""]
    lines += ["## With plain transformers + PEFT", ""]
    why = INPUT_DEPENDENT["hook"] if m["hook"] is not None else INPUT_DEPENDENT.get(m["layout"]["router"])
    if why:
        lines += [f"This model mixes {m['layout']['n_experts']} LoRA experts with {why}. PEFT has no such mixture: "
                  "a plain `PeftModel` of `expert_0/` (or of any expert) is a different model and gives different "
                  "predictions (each `expert_<e>/` alone is a valid PEFT adapter, of that one expert). Load the "
                  "model with `fedlora.load_personalized` as above."]
        return "\n".join(lines) + "\n"
    lines += _peft_lines(m, where)
    if peft_info["base_model_name_or_path"] is not None and not peft_info["exact"]:
        lines += ["", "Caution: " + ("the base update FLoRA merged into the base weights is not in that base (export "
                                     "with the base saved to include it)" if m["base_delta"] else
                                     "that base is not bit-identical to the one fedlora trained on (the packaged copy "
                                     "is de-quantized from GGUF); predictions may differ slightly") + "."]
    if m["prompt_template"]:
        lines += ["", f"fedlora's predict wraps each text in the run's prompt template: {m['prompt_template']!r}."]
    return "\n".join(lines) + "\n"


def _peft_lines(m: dict, where: str) -> list[str]:
    """The exact code that loads expert_0 with transformers + PEFT (num_labels and id2label for a head) and feeds it
    text as fedlora does (truncated to the run's data.max_length)."""
    base = m["peft"]["base_model_name_or_path"]
    if base is None:
        return ["No base model PEFT can load was saved with this export (export it with save_base=True)."]
    saved = m["peft"]["base_saved"]
    base_ref = 'export / "base"' if saved else repr(base)
    if m["model"]["objective"] == "classification":
        labels = dict(enumerate(label_names(m["labels"], m["peft"]["num_labels"])))
        cls, extra = "AutoModelForSequenceClassification", (
            f", num_labels={len(labels)},\n    id2label={labels!r},\n    label2id={ {v: k for k, v in labels.items()}!r}")
        use = [f'inputs = tokenizer(["some text"], truncation=True, max_length={m["max_length"]}, padding=True, '
               'return_tensors="pt")', "print(model(**inputs).logits.argmax(-1))  # label ids, as in id2label"]
    else:
        cls, extra = "AutoModelForCausalLM", ""
        use = [f'inputs = tokenizer(["some text"], truncation=True, max_length={m["max_length"]}, return_tensors="pt")',
               f"print(tokenizer.decode(model.generate(**inputs, do_sample=False, max_new_tokens={m['max_new_tokens']})"
               "[0, inputs.input_ids.shape[1]:], skip_special_tokens=True))"]
    same = "; plain PEFT gives fedlora's logits" if m["peft"]["exact"] else ""
    lines = [f"One LoRA (a fixed-weight mixture is already folded into it){same}:", "", "```python",
             "from pathlib import Path", "", "from peft import PeftModel", f"from transformers import AutoTokenizer, {cls}",
             "", f"export = Path({where!r})  # this directory: change it if you move the export",
             f"base = {cls}.from_pretrained(\n    {base_ref}{extra})",
             'model = PeftModel.from_pretrained(base, export / "expert_0").eval()',
             f"tokenizer = AutoTokenizer.from_pretrained({base_ref})", *use, "```", "",
             (f"Texts are truncated to {m['max_length']} tokens as fedlora's training and `fedlora predict` did (without "
              "it a longer text can get another label); the logits have one column per label, in id2label's order."
              if extra else "fedlora generates greedily (do_sample=False).")]
    if not saved:
        lines += ["", f"The base `{base}` is loaded by name: offline (HF_HUB_OFFLINE=1) it must already be in the "
                  "Hugging Face cache of the machine that loads it (or export with save_base=True to carry it along)."]
    return lines
