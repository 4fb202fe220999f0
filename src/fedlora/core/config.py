"""The experiment configuration: one typed, validated object loaded from TOML/YAML plus `--set` overrides.

Every section forbids unknown keys, so a misspelt key is an error that names the valid ones.
Algorithm-specific options live in `algorithm.options` and are validated by the algorithm itself.
"""

from __future__ import annotations

import difflib
import tomllib
import typing
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import AliasChoices, BaseModel, Field, ValidationError, field_validator, model_validator

from .errors import ConfigError
from .per_client import ClientsConfig, Section


class ModelConfig(Section):
    """The frozen base model."""

    name: str = Field(description="'minilm' (or 'sentence-transformers/all-MiniLM-L6-v2'), 'smollm2' (or "
                      "'HuggingFaceTB/SmolLM2-135M-Instruct'), 'tiny-bert', 'tiny-llama' or a local Hugging Face "
                      "model directory (docs/models.md)")
    objective: Literal["classification", "causal_lm"] | None = Field(
        None, validation_alias=AliasChoices("objective", "task"),  # `task`: the name before 0.2, in older run dirs
        description="classification head or causal LM; inferred from the name when omitted")
    dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description="the frozen base's storage dtype")
    device: str = Field("auto", pattern=r"^(auto|cpu|mps|cuda(:\d+)?)$",
                        description="auto (CUDA when present, else the CPU), cpu, cuda, cuda:N or mps")
    revision: str | None = Field(None, description="a Hub model's branch, tag or commit")
    trust_remote_code: bool = Field(False, description="let a Hub model run its own modelling code")
    quantization: Literal["none", "8bit", "4bit"] = Field("none", description="a bitsandbytes-quantized base "
                                                           "(QLoRA; pip install 'fedlora[quantization]')")
    quant_type: Literal["nf4", "fp4"] = Field("nf4", description="4bit: the data type")
    double_quant: bool = Field(True, description="4bit: quantize the quantization constants too")


class LoRAConfig(Section):
    """Rank, scaling and placement of every LoRA expert."""

    r: int = Field(8, gt=0)
    alpha: float = Field(16.0, gt=0)
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: list[str] | str | None = Field(
        None, description="module-name suffixes, or one regex over full names; default q_proj,v_proj / query,value")
    modules_to_save: list[str] | None = Field(
        None, description="module-name suffixes trained in full and kept private with the head, as PEFT's "
        "modules_to_save (default: the classification head, classifier / score); e.g. [\"classifier\", \"pooler\"] "
        "also trains a BERT pooler, as RoBERTa's classification head trains its dense layer")


class DataConfig(Section):
    """Which data, how it is split over clients, and how it is tokenized."""

    suite: Literal["nlu", "nlg", "glue"] | None = Field(None, description="a built-in benchmark suite (overrides "
                                                        "dataset): glue (4 binary tasks), nlu (many-label), nlg")
    dataset: str = Field("wordnet-demo", description="'wordnet-demo', a JSONL/CSV file, or hf:<name or local dir>")
    fields: dict[str, str] = Field(default_factory=dict, description="our field -> the file's field, e.g. text: sentence")
    hf_split: str = Field("train", description="split of an hf: dataset")
    tasks: list[str] | None = Field(None, description="task names to use (default: all of the dataset's)")
    clients_per_task: int | None = Field(None, gt=0, description="clients per task (default: 2; under partition "
                                         "'by_key', one client per distinct key value of the task)")
    partition: Literal["dirichlet", "iid", "by_key"] = "dirichlet"
    partition_key: str | None = Field(None, description="record field whose values define clients (by_key)")
    dirichlet_alpha: float = Field(0.5, gt=0)
    pool_per_task: int | None = Field(None, gt=0, description="suite examples drawn per task (default 2x what clients use)")
    train_per_client: int = Field(200, gt=0)
    test_per_client: int = Field(50, gt=0)
    max_length: int = Field(64, ge=8)

    @model_validator(mode="after")
    def _key_for_by_key(self) -> "DataConfig":
        if self.partition == "by_key" and not self.partition_key:
            raise ValueError("partition 'by_key' needs partition_key (a record field such as 'language')")
        return self


class TrainingConfig(Section):
    """The local trainer every method shares."""

    optimizer: Literal["adamw"] = "adamw"
    lr: float = Field(3e-4, gt=0)
    weight_decay: float = Field(0.05, ge=0)
    schedule: Literal["linear", "constant"] = Field("linear", description="linear decays to 0 within each round")
    warmup_steps: int = Field(0, ge=0)
    reset_optimizer: bool = Field(True, description="fresh optimizer each round, as the official codes do")
    local_steps: int | None = Field(None, gt=0)
    local_epochs: float | None = Field(None, gt=0)
    batch_size: int = Field(16, gt=0)
    eval_batch_size: int = Field(64, gt=0)
    grad_clip: float | None = Field(1.0, gt=0)
    train_head: bool = Field(True, description="train each client's private classification head")
    max_new_tokens: int = Field(32, gt=0)
    precision: Literal["fp32", "bf16", "fp16"] = Field(
        "fp32", description="autocast dtype of the forward pass; trainable parameters stay fp32 (fp16: with a "
        "gradient scaler, CUDA only)")
    gradient_checkpointing: bool = Field(False, description="recompute activations in the backward pass (less "
                                         "memory, about a third more compute)")
    compile: bool = Field(False, description="torch.compile the model's forward (inductor; eager's random numbers for "
                          "dropout, so results equal eager's to float tolerance); clients trained alone only")

    @model_validator(mode="after")
    def _one_budget(self) -> "TrainingConfig":
        if self.local_steps is None and self.local_epochs is None:
            self.local_steps = 10
        if self.local_steps is not None and self.local_epochs is not None:
            raise ValueError("set either local_steps or local_epochs, not both (to count epochs on a config "
                             "that counts steps, also set training.local_steps=null)")
        return self


class SecAggConfig(Section):
    """SecAgg+'s parameters (`federation.secure_aggregation`): Flower's SecAggPlusWorkflow's, with its defaults."""

    num_shares: int | float = Field(1.0, gt=0, description="neighbours each client shares its secrets with: a count "
                                    "(> 2), or a fraction of the round's clients (1.0: all of them)")
    reconstruction_threshold: int | float = Field(0.5, gt=0, description="shares needed to recover a secret: a count, "
                                                  "or a fraction of num_shares; more tolerates fewer dropouts but "
                                                  "resists larger colluding sets")
    clipping_range: float = Field(8.0, gt=0, description="each weighted coordinate is clipped to +-this before it is "
                                  "quantized")
    quantization_range: int = Field(2**22, gt=1, description="integer levels of the quantized range")
    modulus_range: int = Field(2**32, gt=1, le=2**32, description="masks' modulus, a power of 2 above quantization_range "
                               "x the clients of a round")

    @model_validator(mode="after")
    def _ranges(self) -> "SecAggConfig":
        if self.modulus_range & (self.modulus_range - 1) or self.modulus_range <= self.quantization_range:
            raise ValueError("federation.secagg.modulus_range must be a power of 2 above quantization_range")
        if isinstance(self.num_shares, int) and self.num_shares <= 2:
            raise ValueError("federation.secagg.num_shares as a count must be more than 2 (or a fraction like 1.0)")
        t, n = self.reconstruction_threshold, self.num_shares
        if isinstance(t, float) and t > 1:
            raise ValueError("federation.secagg.reconstruction_threshold as a fraction must be at most 1")
        if isinstance(t, int) and (t < 2 or isinstance(n, int) and t > n):
            raise ValueError(f"federation.secagg.reconstruction_threshold={t} must be a count from 2 to num_shares")
        return self

    def wrap_problem(self, clients: int) -> str | None:
        """Why the masked sum of `clients` clients' values would wrap around the modulus, or None."""
        if clients * self.quantization_range < self.modulus_range:
            return None
        return (f"SecAgg+ sums {clients} clients' values of up to quantization_range={self.quantization_range} "
                f"modulo modulus_range={self.modulus_range}, which wraps; set federation.secagg.quantization_range "
                f"to at most {(self.modulus_range - 1) // clients}")


class FederationConfig(Section):
    """Rounds and client sampling."""

    rounds: int = Field(3, gt=0)
    clients_per_round: int | None = Field(None, gt=0, description="default: every client every round")
    eval_every: int = Field(1, gt=0)
    eval_at_start: bool = Field(True, description="evaluate the untrained start as round 0")
    min_clients: int = Field(1, gt=0)
    max_state_norm: float | None = Field(None, gt=0, description="reject a reply holding a state (the LoRA, router "
                                         "etc. it sends, not its update) whose L2 norm is larger; None: off")
    round_timeout: float | None = Field(3600.0, gt=0, description="seconds to wait for a round's replies (Flower); "
                                        "a hung node then counts as failed; None: no limit")
    update_clip: float | Literal["adaptive"] | None = Field(
        "adaptive", description="clip each client's update (its state minus what it received) to this L2 norm; "
        "'adaptive': to update_clip_factor x the round's median update norm (needs 3 or more replies); None: off")
    update_clip_factor: float = Field(3.0, gt=1, description="the adaptive clip as a multiple of the median norm (3: "
                                      "no honest update clipped in the robustness benchmark; 10 let FedLEASE's poisoned "
                                      "warm-up LoRA through)")
    aggregation: Literal["mean", "median", "trimmed_mean"] = Field(
        "mean", description="how servers combine client states key by key: the (weighted) mean, or the unweighted "
        "coordinate-wise median / trimmed mean (robust to a minority of poisoned updates)")
    trim_fraction: float = Field(0.1, ge=0, lt=0.5, description="trimmed_mean: the fraction cut from each end")
    secure_aggregation: bool = Field(False, description="SecAgg+ (Flower's): the server learns only the weighted sums "
                                     "of a round's updates (docs/privacy.md); methods whose server needs single updates "
                                     "are refused")
    secagg: SecAggConfig = Field(default_factory=SecAggConfig)

    @model_validator(mode="before")
    @classmethod
    def _renamed(cls, data: Any) -> Any:
        # max_update_norm always bounded the state's norm, not the update's: renamed, still read from older configs
        if isinstance(data, dict) and data.get("max_update_norm") is not None:
            if data.get("max_state_norm") not in (None, data["max_update_norm"]):
                raise ValueError("federation.max_update_norm is the old name of max_state_norm: set only max_state_norm")
            data = {**data, "max_state_norm": data["max_update_norm"]}
        return {k: v for k, v in data.items() if k != "max_update_norm"} if isinstance(data, dict) else data


class AlgorithmConfig(Section):
    """The method and its own options (validated by the method)."""

    name: str = "fedit"
    options: dict[str, Any] = Field(default_factory=dict)
    per_method: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="options by method name, used whenever that method runs (`run` with "
        "algorithm.name set to it, `compare`); algorithm.options wins over its entry")

    def options_for(self, method: str) -> dict[str, Any]:
        """The options of `method`: its per_method entry, overridden by `options` when it is the configured one."""
        merged = dict(self.per_method.get(method, {}))
        if method == self.name:
            merged.update(self.options)
        return merged

    @property
    def active_options(self) -> dict[str, Any]:
        """The options the configured method runs with: its per_method entry, overridden by `options`."""
        return self.options_for(self.name)


class EngineConfig(Section):
    """Where the round loop runs."""

    # flower-local: a SuperLink and one SuperNode process per client on this machine (TLS, node authentication);
    # flower-deployment: what a deployment's ServerApp records in its run directory (it runs through `flwr run`)
    name: Literal["inprocess", "flower-sim", "flower-local", "flower-deployment"] = "inprocess"
    torch_threads: int | None = Field(None, gt=0)
    progress: bool = True
    checkpoint_every: int = Field(1, ge=0, description="rounds between checkpoints (0: only the final one)")
    num_clients: int | None = Field(None, gt=0, description="SuperNodes the Flower server waits for (set by flower-sim)")
    cpus: int | None = Field(None, gt=0, description="CPUs Flower's simulation may use (default: all)")
    client_gpus: float = Field(0.0, ge=0, description="flower-sim: GPUs per ClientApp (0.25: four clients share "
                               "one GPU); 0: none")
    handshake_timeout: float = Field(600.0, gt=0, description="seconds the Flower server waits for every SuperNode")
    warm_clients: bool = Field(True, description="flower-local: each SuperNode keeps one warm worker with the model "
                               "built (false: a fresh process per message, as Flower does; docs/deployment.md)")
    client_batch: int | Literal["auto"] = Field(1, description="in-process: clients trained together in one "
                                                "forward/backward over the shared base (1: one after another; auto: "
                                                "as many as fit in GPU memory, 4 on a CPU; docs/batched.md)")
    grouped_lora: bool | None = Field(None, description="client_batch > 1: the clients' LoRA experts in grouped "
                                      "matrix products (torch grouped_mm) rather than a loop over clients; default: "
                                      "where it has a fast kernel (CUDA, bf16)")
    clients: list[str] | None = Field(None, description="Flower: the client ids the operator admits; a node that "
                                      "claims another id is left out (default: any id, up to num_clients nodes)")

    @field_validator("client_batch")
    @classmethod
    def _positive_batch(cls, value: int | str) -> int | str:
        if isinstance(value, int) and value < 1:
            raise ValueError(f"engine.client_batch must be a positive number of clients or 'auto', got {value}")
        return value


class PrivacyConfig(Section):
    """Client-level differential privacy of every upload (docs/privacy.md)."""

    dp: Literal["none", "client_clipping", "local"] = Field(
        "none", description="client_clipping: clients clip their updates, the server noises every sum it forms "
        "(central DP, a trusted server); local: clients also noise what they upload (no trusted server)")
    clip_norm: float = Field(1.0, gt=0, description="L2 bound of a client's whole upload update per round")
    noise_multiplier: float | None = Field(None, ge=0, description="noise std / clip_norm (set this or "
                                           "target_epsilon)")
    target_epsilon: float | None = Field(None, gt=0, description="calibrate noise_multiplier so that the "
                                         "whole run spends this epsilon")
    delta: float = Field(1e-5, gt=0, lt=1, description="the delta of the reported (epsilon, delta)")
    max_epsilon: float | None = Field(None, gt=0, description="stop the run before a round would spend more")
    secure_noise: bool | None = Field(None, description="draw the noise from the OS, unknown to anyone (not "
                                      "reproducible), instead of from the run's seed, which lets whoever knows "
                                      "the seed remove it; default: on in an app `fedlora deploy app` builds for "
                                      "other machines, off elsewhere")

    @model_validator(mode="after")
    def _one_noise(self) -> "PrivacyConfig":
        if self.dp != "none" and (self.noise_multiplier is None) == (self.target_epsilon is None):
            raise ValueError(f"privacy.dp={self.dp!r} needs exactly one of noise_multiplier (noise std / clip_norm) "
                             "and target_epsilon (the run's whole budget)")
        return self


class Config(Section):
    """A whole experiment."""

    name: str = "experiment"
    seed: int = 0
    output_dir: str | None = Field(None, description="default: runs/<name>")
    model: ModelConfig
    lora: LoRAConfig = Field(default_factory=LoRAConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    federation: FederationConfig = Field(default_factory=FederationConfig)
    algorithm: AlgorithmConfig = Field(default_factory=AlgorithmConfig)
    engine: EngineConfig = Field(default_factory=EngineConfig)
    clients: ClientsConfig = Field(default_factory=ClientsConfig)
    privacy: PrivacyConfig = Field(default_factory=PrivacyConfig)
    tracking: list[Literal["tensorboard", "wandb", "mlflow"]] = Field(
        default_factory=list, description="experiment trackers that get every round's metrics (HF's report_to)")

    @property
    def run_dir(self) -> Path:
        """Where the run writes its files."""
        return Path(self.output_dir) if self.output_dir else Path("runs") / self.name

    def with_absolute_paths(self, base: Path | None = None) -> "Config":
        """A copy whose relative paths (the run directory, a dataset file or `hf:` directory, a local model
        directory) are absolute against `base` (default: the working directory): what config.json records, and
        what processes that run elsewhere read (flower-local's SuperLink, SuperNodes and ServerApp)."""
        base = Path(base or Path.cwd())

        def absolute(value: str, prefix: str = "") -> str:
            path = base / value.removeprefix(prefix)  # an absolute value stays itself
            return f"{prefix}{path}" if path.exists() else value  # a name (minilm, wordnet-demo) stays a name

        dataset = absolute(self.data.dataset, "hf:" if self.data.dataset.startswith("hf:") else "")
        return self.model_copy(update={"output_dir": str(base / self.run_dir),
                                       "data": self.data.model_copy(update={"dataset": dataset}),
                                       "model": self.model.model_copy(update={"name": absolute(self.model.name)})})

    def with_overrides(self, overrides: list[str]) -> "Config":
        """A copy with `section.key=value` overrides applied (values parsed as YAML scalars)."""
        return build_config(apply_overrides(self.model_dump(), overrides))


def _model_at(loc: tuple, root: type[BaseModel]) -> type[BaseModel] | None:
    model: Any = root
    for part in loc:
        if part in _UNION_TAGS:  # a tagged union's branch (clients.lora_r.proportional): the section itself
            continue
        field = getattr(model, "model_fields", {}).get(part)
        if field is None:
            return None
        model = _section_in(field.annotation)
        if model is None:
            return None
    return model


_UNION_TAGS = {"value", "list", "mapping", "proportional"}


def _section_in(annotation: Any) -> type[BaseModel] | None:
    """The config section an annotation holds, also inside Annotated/union types (per-client rules)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _section_in(arg)
        if found is not None:
            return found
    return None


def _explain(exc: ValidationError) -> str:
    lines = []
    for err in exc.errors():
        loc = tuple(p for p in err["loc"] if isinstance(p, str))
        where = ".".join(str(p) for p in err["loc"]) or "config"
        if err["type"] == "extra_forbidden":
            parent = _model_at(loc[:-1], Config)
            valid = sorted(parent.model_fields) if parent else []
            close = difflib.get_close_matches(loc[-1], valid, n=1)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            section = ".".join(loc[:-1]) or "top level"
            lines.append(f"unknown key '{where}'.{hint} Valid keys in [{section}]: {', '.join(valid)}")
        elif err["type"] == "missing":
            lines.append(f"missing required value '{where}'")
        else:
            given = err.get("input")  # a whole section's check: its message says what is wrong, not the section
            got = "" if isinstance(given, dict) else f" (got {given!r})"
            lines.append(f"invalid value for '{where}': {err['msg']}{got}")
    return "invalid configuration:\n  " + "\n  ".join(lines)


def build_config(data: dict[str, Any] | None = None) -> Config:
    """Validate a plain dict into a Config; problems raise ConfigError with every issue listed."""
    try:
        return Config.model_validate(data or {})
    except ValidationError as exc:
        raise ConfigError(_explain(exc)) from None


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `a.b.c=value` strings to a nested dict (values are parsed as YAML, so 3, 1e-3, true, [a,b] work)."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r} is not of the form section.key=value")
        *parents, leaf = key.strip().split(".")
        node = data
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: '{p}' is a value, not a section")
        try:
            node[leaf] = yaml.safe_load(raw)
        except yaml.YAMLError as exc:
            raise ConfigError(f"override {item!r}: the value {raw!r} does not parse as YAML "
                              f"({getattr(exc, 'problem', exc)}); quote it to give a string") from None
    return data


def builtin_configs() -> list[str]:
    """Names of the ready-made configs shipped in the package (demo, nlu-quick, nlg-paper, ...)."""
    return sorted(p.name.removesuffix(".toml") for p in resources.files("fedlora.configs").iterdir()
                  if p.name.endswith(".toml"))


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Load a TOML or YAML file or a built-in config by name (or defaults when None), then apply overrides."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file() and str(path) in builtin_configs():
            path = Path(str(resources.files("fedlora.configs") / f"{path}.toml"))
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist (built-in configs: {', '.join(builtin_configs())})")
        text = path.read_text()
        try:
            data = tomllib.loads(text) if path.suffix == ".toml" else (yaml.safe_load(text) or {})
        except (tomllib.TOMLDecodeError, yaml.YAMLError) as exc:
            raise ConfigError(f"config file {path} does not parse: {exc}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config file {path} must hold a mapping of sections")
    return build_config(apply_overrides(data, overrides or []))


def as_config(config: Config | dict[str, Any] | str | Path, overrides: list[str] | None = None) -> Config:
    """A validated Config from a Config, a dict or a file path, with overrides applied."""
    if isinstance(config, Config):
        return config.with_overrides(overrides) if overrides else config
    if isinstance(config, dict):
        return build_config(config).with_overrides(overrides or [])
    return load_config(config, overrides)
