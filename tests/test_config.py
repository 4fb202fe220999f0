"""Configuration: loading, overrides and the errors a user sees."""

from __future__ import annotations

import pytest

from fedlora.algorithms import parse_options
from fedlora.core.config import build_config, load_config
from fedlora.core.errors import ConfigError


def test_toml_yaml_and_overrides(tmp_path):
    (tmp_path / "c.toml").write_text('[model]\nname = "tiny-bert"\n[training]\nlr = 0.01\n')
    (tmp_path / "c.yaml").write_text("model:\n  name: tiny-bert\ntraining:\n  lr: 0.01\n")
    for name in ("c.toml", "c.yaml"):
        cfg = load_config(tmp_path / name, ["training.local_steps=7", "lora.target_modules=[q_proj, v_proj]"])
        assert cfg.training.lr == 0.01 and cfg.training.local_steps == 7
        assert cfg.lora.target_modules == ["q_proj", "v_proj"]


def test_unknown_key_names_the_valid_ones_and_suggests():
    with pytest.raises(ConfigError) as exc:
        build_config({"model": {"name": "tiny-bert"}, "training": {"lrr": 1e-3}})
    msg = str(exc.value)
    assert "unknown key 'training.lrr'" in msg and "Did you mean 'lr'" in msg and "batch_size" in msg


def test_wrong_type_and_missing_value():
    with pytest.raises(ConfigError, match="invalid value for 'training.batch_size'"):
        build_config({"model": {"name": "tiny-bert"}, "training": {"batch_size": "large"}})
    with pytest.raises(ConfigError, match="missing required value 'model'"):
        build_config({})
    with pytest.raises(ConfigError, match="missing required value 'model.name'"):
        build_config({"model": {}})
    with pytest.raises(ConfigError, match="either local_steps or local_epochs") as both:
        build_config({"model": {"name": "x"}, "training": {"local_steps": 2, "local_epochs": 1}})
    assert "training.local_steps=null" in str(both.value) and "got {" not in str(both.value)  # not the whole section


def test_bad_override_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="section.key=value"):
        load_config(None, ["training.lr"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.toml")


def test_algorithm_options_are_validated_by_the_method():
    with pytest.raises(ConfigError, match="Valid options: weighting"):
        parse_options("fedit", {"weighing": "uniform"})
    with pytest.raises(ConfigError, match="unknown algorithm.name 'fedavg'"):
        parse_options("fedavg", {})


def test_a_methods_per_method_entry_applies_whenever_it_runs_and_options_win(tmp_path):
    from fedlora.engines.session import build_session

    from .conftest import tiny_config

    algorithm = {"name": "fedlease", "per_method": {"fedlease": {"warmup_rounds": 2, "max_experts": 3},
                                                    "fdlora": {"sync_every": 2}}}
    assert build_session(build_config(tiny_config(tmp_path, algorithm=algorithm))).server.options.warmup_rounds == 2
    session = build_session(build_config(tiny_config(tmp_path, algorithm={**algorithm, "options": {"warmup_rounds": 1}})))
    assert (session.server.options.warmup_rounds, session.server.options.max_experts) == (1, 3)


def test_a_config_error_is_reported_without_importing_torch():
    import subprocess
    import sys

    code = ("import sys; from fedlora.cli import main; rc = main(['run', 'demo', '--set', 'training.lrr=1']); "
            "print(rc, 'torch' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.stdout.split() == ["2", "False"] and "Did you mean 'lr'" in done.stderr


@pytest.mark.parametrize("method,options,rounds,says", [
    ("fedlease", {"warmup_rounds": 3}, 3, "no clustered round"),
    ("fdlora", {"stage1_rounds": 2}, 2, "no stage-2 round"),
    ("fdlora", {"stage1_rounds": 1, "sync_every": 5}, 3, "never synced")])
def test_a_schedule_the_rounds_cannot_hold_is_warned_before_round_1(method, options, rounds, says):
    from fedlora.adapters import AdapterSpec
    from fedlora.algorithms import ClientInfo, build

    server, _ = build(method, options, AdapterSpec((("m", 3, 2),), r=2, alpha=4), 0)
    server.setup([ClientInfo("a", 1)], rounds)
    assert any(says in p for p in server.schedule_problems(rounds))
    assert server.schedule_problems(rounds + 5) == []


def test_relative_paths_become_absolute_against_the_working_directory(tmp_path, monkeypatch):
    """#38: flower-local's processes run in directories of their own; a relative output_dir or dataset broke them."""
    from fedlora.core.config import build_config

    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "corpus.jsonl").write_text('{"text": "a", "label": "x"}\n')
    (tmp_path / "my-model").mkdir()
    monkeypatch.chdir(tmp_path)
    cfg = build_config({"model": {"name": "my-model"}, "data": {"dataset": "data/corpus.jsonl"},
                        "output_dir": "runs/demo-deployed"}).with_absolute_paths()
    assert cfg.output_dir == str(tmp_path / "runs" / "demo-deployed")
    assert cfg.data.dataset == str(tmp_path / "data" / "corpus.jsonl") and cfg.model.name == str(tmp_path / "my-model")
    named = build_config({"model": {"name": "minilm"}, "data": {"dataset": "hf:data"}}).with_absolute_paths()
    assert named.model.name == "minilm" and named.data.dataset == f"hf:{tmp_path / 'data'}"  # names stay names
    assert named.output_dir == str(tmp_path / "runs" / "experiment")


def test_the_old_name_max_update_norm_is_read_as_max_state_norm_and_old_checkpoints_still_verify():
    from fedlora.core.config import FederationConfig
    from fedlora.engines.checkpoint import config_hashes

    assert FederationConfig.model_validate({"max_update_norm": 5.0}).max_state_norm == 5.0
    assert FederationConfig.model_validate({"max_update_norm": None, "max_state_norm": 2.0}).max_state_norm == 2.0
    with pytest.raises(ValueError, match="old name of max_state_norm"):
        FederationConfig.model_validate({"max_update_norm": 5.0, "max_state_norm": 2.0})
    assert load_config("demo", ["federation.max_update_norm=3"]).federation.max_state_norm == 3.0
    assert (config_hashes({"federation": {"max_update_norm": 5.0}})
            == config_hashes({"federation": {"max_state_norm": 5.0}})
            != config_hashes({"federation": {"max_state_norm": 4.0}}))


def test_library_notices_about_optional_kernels_never_reach_the_console():
    """#38 item 2: bitsandbytes (imported by PEFT on every run) and `kernels` warned on every run, quantized or not."""
    import logging
    import subprocess
    import sys

    from fedlora.core.offline import use_offline

    use_offline()
    for name in ("kernels._internals.hf_hub", "bitsandbytes.backends.cpu.ops"):
        assert logging.getLogger(name).getEffectiveLevel() >= logging.ERROR
    code = ("from fedlora.core.offline import use_offline; use_offline(); import logging; "
            "logging.getLogger('kernels._internals.hf_hub').warning('Skipping publisher trust check')")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stderr == ""
