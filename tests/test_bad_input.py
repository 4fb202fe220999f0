"""Bad input gives one clear error or warning that says what to do, never a traceback from inside a library.

Everything goes through the public API or the CLI (`fedlora.cli.main`, which returns 2 and prints one
'fedlora: error: ...' line for a FedloraError; any other exception would fail these tests). The corpus readers'
own messages are checked in tests/test_corpora.py and the config validator's in tests/test_config.py; here they
are checked as a user meets them.
"""

from __future__ import annotations

import json
import logging
import math

import pytest
import tomli_w

from fedlora import run_experiment
from fedlora.cli import main
from fedlora.core.config import build_config
from fedlora.core.errors import ConfigError, DataError
from fedlora.data.federated import build_clients
from fedlora.engines.session import build_session

from .conftest import tiny_config


def cli_error(capsys, *argv: str) -> str:
    """Run the CLI, which must fail with exit code 2 and one 'fedlora: error:' message; return the message."""
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("fedlora: error: ") and "Traceback" not in err, err
    return err


@pytest.fixture
def config_file(tmp_path):
    """The tiny experiment as a TOML file, its output under tmp_path/run."""
    path = tmp_path / "exp.toml"
    path.write_text(tomli_w.dumps(tiny_config(tmp_path, federation={"rounds": 1}, training={"local_steps": 1})))
    return path


def write_jsonl(path, records: list[dict]):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


# -- malformed config values -------------------------------------------------------------------------------

@pytest.mark.parametrize("override,expected", [
    ("federation.rounds=-1", "invalid value for 'federation.rounds': Input should be greater than 0 (got -1)"),
    ("training.batch_size=large", "invalid value for 'training.batch_size'"),
    ("data.partition=random", "invalid value for 'data.partition': Input should be 'dirichlet', 'iid' or 'by_key'"),
    ("training.lrr=0.1", "unknown key 'training.lrr'. Did you mean 'lr'?"),
    ("trainng.lr=0.1", "unknown key 'trainng'. Did you mean 'training'?"),
    ("federation.min_clients=0", "invalid value for 'federation.min_clients'"),
    ("algorithm.name=fedavg", "unknown algorithm.name 'fedavg'; available: local, fedit"),
    ("algorithm.options.weighing=uniform", "Valid options: weighting"),
    ("training.lr", "is not of the form section.key=value"),
])
def test_a_bad_config_value_is_one_error_naming_the_key(capsys, config_file, override, expected):
    assert expected in cli_error(capsys, "run", config_file, "--quiet", "--set", override)


def test_misspelt_methods_fail_before_any_run_starts(capsys, tmp_path, config_file):
    err = cli_error(capsys, "run", config_file, "--quiet", "--set", "algorithm.per_method.fedleas.warmup_rounds=2")
    assert "algorithm.per_method names unknown methods ['fedleas']; available: local, fedit" in err
    err = cli_error(capsys, "run", config_file, "--quiet", "--set", "algorithm.per_method.fedlease.warmup=2")
    assert "invalid algorithm.options for 'fedlease': warmup" in err and "warmup_rounds" in err
    assert not (tmp_path / "run").exists()  # refused before the run directory was made
    # compare checks every method first: nothing of `local` may have run when `nosuch` is refused
    err = cli_error(capsys, "compare", config_file, "--quiet", "--methods", "local,nosuch")
    assert "unknown algorithm.name 'nosuch'" in err and not (tmp_path / "run").exists()
    assert "compare needs at least one method" in cli_error(capsys, "compare", config_file, "--methods", ",")
    assert not (tmp_path / "run").exists()
    err = cli_error(capsys, "deploy", "app", tmp_path / "app", config_file, "--set", "algorithm.name=nosuch")
    assert "unknown algorithm.name 'nosuch'" in err and not (tmp_path / "app").exists()


def test_resume_refuses_settings_it_would_ignore(capsys, tmp_path, config_file):
    err = cli_error(capsys, "run", config_file, "--resume", tmp_path, "--set", "training.lr=1")
    assert "--resume continues a run with its own saved config; drop CONFIG, --set" in err
    assert "give a CONFIG (a file, or a built-in name such as nlu-quick) or --resume" in cli_error(capsys, "run")


def test_a_config_file_that_does_not_parse_says_where(capsys, tmp_path):
    (tmp_path / "broken.toml").write_text('[model]\nname = "tiny-bert\n')
    err = cli_error(capsys, "run", tmp_path / "broken.toml")
    assert f"config file {tmp_path / 'broken.toml'} does not parse" in err and "line 2" in err


def test_an_override_whose_value_does_not_parse_is_one_error(capsys, config_file):
    assert "training.lr" in cli_error(capsys, "run", config_file, "--set", "training.lr=[1,")


# -- paths that do not exist -------------------------------------------------------------------------------

def test_missing_files_and_directories_are_named_with_what_to_give_instead(capsys, tmp_path, config_file):
    nowhere = tmp_path / "nowhere"
    assert "config file missing.toml does not exist (built-in configs: demo" in cli_error(capsys, "run", "missing.toml")
    err = cli_error(capsys, "run", config_file, "--quiet", "--set", f"data.dataset={tmp_path / 'missing.jsonl'}")
    assert f"data file {tmp_path / 'missing.jsonl'} does not exist" in err
    assert f"{nowhere} is not a fedlora run directory (no config.json)" in cli_error(capsys, "run", "--resume", nowhere)
    stopped = tmp_path / "stopped"  # a run that stopped before its first checkpoint
    stopped.mkdir()
    (stopped / "config.json").write_text(json.dumps(build_config(tiny_config(tmp_path)).model_dump(mode="json")))
    assert "has no checkpoint to resume from" in cli_error(capsys, "run", "--resume", stopped)
    assert f"run directory {nowhere} does not exist" in cli_error(capsys, "export", nowhere, "--client", "c",
                                                                  "--out", tmp_path / "out")
    assert f"{tmp_path} is not a fedlora run directory (no config.json)" in cli_error(
        capsys, "export", tmp_path, "--client", "c", "--out", tmp_path / "out")
    assert f"run directory {nowhere} does not exist" in cli_error(capsys, "predict", nowhere, "--client", "c",
                                                                  "--file", config_file)
    assert f"text file {tmp_path / 'texts.txt'} does not exist" in cli_error(
        capsys, "predict", nowhere, "--client", "c", "--file", tmp_path / "texts.txt")
    assert f"{nowhere} holds no run" in cli_error(capsys, "report", nowhere)


def test_a_corpus_that_is_not_installed_says_how_to_install_it(capsys, tmp_path, monkeypatch, config_file):
    """The reader-level messages are tests/test_corpora.py's; this is the same error met through `fedlora run`."""
    monkeypatch.setenv("FEDLORA_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr("fedlora.data.wordnet.WORDNET_DIR", "/nonexistent/wordnet")
    err = cli_error(capsys, "run", config_file, "--quiet", "--set", "data.suite=nlu")
    assert "the wordnet corpus is not installed" in err and "Run 'fedlora prepare-data'" in err


# -- data that cannot be split or read ---------------------------------------------------------------------

def test_more_clients_than_records_names_the_task_and_the_largest_possible_client_count(tmp_path):
    data = write_jsonl(tmp_path / "few.jsonl", [{"text": f"t{i}", "label": "ab"[i % 2], "task": "t"} for i in range(5)])
    cfg = tiny_config(tmp_path, data={"dataset": str(data), "tasks": None, "clients_per_task": 3})
    with pytest.raises(DataError, match=r"task 't' has 5 record\(s\), too few for data.clients_per_task=3 clients .*"
                                        r"lower data.clients_per_task to at most 2"):
        run_experiment(cfg)


def test_a_client_left_with_one_record_by_its_key_is_named(tmp_path):
    records = [{"text": f"t{i}", "label": "ab"[i % 2], "owner": "x"} for i in range(5)] + \
              [{"text": "lonely", "label": "a", "owner": "y"}]
    data = write_jsonl(tmp_path / "owners.jsonl", records)
    cfg = tiny_config(tmp_path, data={"dataset": str(data), "tasks": None, "partition": "by_key",
                                      "partition_key": "owner", "clients_per_task": 2})
    with pytest.raises(DataError, match=r"client y gets 1 of task 'task''s 6 records \(data.partition='by_key'\)"):
        run_experiment(cfg)


def test_records_without_the_expected_fields_point_to_data_fields(tmp_path):
    data = write_jsonl(tmp_path / "renamed.jsonl", [{"sentence": f"s{i}", "label": "ab"[i % 2]} for i in range(8)])
    with pytest.raises(DataError, match=r"has fields \['label', 'sentence'\] but needs \['label', 'text'\].*data.fields"):
        run_experiment(tiny_config(tmp_path, data={"dataset": str(data), "tasks": None}))


def test_test_labels_a_client_never_trained_on_are_counted_in_a_warning_and_the_run_completes(tmp_path):
    # two owners, each with one 'a' and one 'b' example: whichever is its test example, it never trained on it
    records = [{"text": f"{label} from {owner}", "label": label, "owner": owner} for owner in "xy" for label in "ab"]
    data = write_jsonl(tmp_path / "owners.jsonl", records)
    result = run_experiment(tiny_config(tmp_path, federation={"rounds": 1}, training={"local_steps": 1}, data={
        "dataset": str(data), "tasks": None, "partition": "by_key", "partition_key": "owner", "clients_per_task": 2,
        "train_per_client": 1, "test_per_client": 1}))
    log = (result.run_dir / "run.log").read_text()
    assert "WARNING 2 client(s) have test examples whose label never occurs in their own training split" in log
    assert "{'x': 1, 'y': 1}" in log  # by_key clients are named by their owner
    assert all(math.isfinite(m["loss"]) and m["accuracy"] in (0.0, 1.0) for m in result.final.values())


def test_texts_longer_than_max_length_are_truncated_counted_and_reported(tmp_path, caplog):
    texts = ["x" * 40, "ab", "y" * 30, "cd", "ef", "z" * 9, "gh", "ij"]  # byte tokens + [CLS] [SEP]: 3 exceed 8
    data = write_jsonl(tmp_path / "long.jsonl", [{"text": t, "label": "ab"[i % 2]} for i, t in enumerate(texts)])
    cfg = build_config(tiny_config(tmp_path, data={"dataset": str(data), "tasks": None, "partition": "iid",
                                                   "train_per_client": 3, "test_per_client": 1, "max_length": 8}))
    with caplog.at_level(logging.WARNING, logger="fedlora"):
        session = build_session(cfg)
    assert "3 texts were longer than data.max_length=8 and were truncated" in caplog.text
    encoded = [seq for d in session.runtime.datasets.values() for split in (d.train, d.test) for seq in split.input_ids]
    assert len(encoded) == 8 and max(map(len, encoded)) == 8


# -- a base model without the target modules ---------------------------------------------------------------

@pytest.mark.parametrize("targets,expected", [
    ("[q_proj, v_proj]", "no module of the model matches lora.target_modules=['q_proj', 'v_proj']"),
    ("query", "for the suffix give a list, ['query']"),
    ("'('", "is not a valid regular expression"),
])
def test_target_modules_that_match_nothing_list_the_models_linear_modules(capsys, config_file, targets, expected):
    err = cli_error(capsys, "run", config_file, "--quiet", "--set", f"lora.target_modules={targets}")
    assert expected in err
    if "regular expression" not in expected:
        assert "['classifier', 'dense', 'key', 'query', 'value']" in err and "bert.encoder.layer.0" in err


def test_names_that_would_leave_a_directory_are_refused(tmp_path):
    from fedlora.core.names import name_problem, safe_name, sanitize_name
    from fedlora.serving import export_client, predict

    for bad in ["../../x", "/home/user/.ssh/id", "a/b", "..", ".hidden", "x" * 101, "", "a b", 7]:
        assert name_problem(bad) is not None, bad
    assert name_problem("noun_topic-0") is None and name_problem("hospital.7") is None
    assert sanitize_name("Alice & Bob/../x") == "Alice-Bob-.-x" and name_problem(sanitize_name("../../..")) is None
    with pytest.raises(ConfigError, match="not a safe name"):
        safe_name("../evil")
    with pytest.raises(ConfigError, match="not a safe name"):
        predict(tmp_path, "../../outside", ["text"])
    with pytest.raises(ConfigError, match="not a safe name"):
        export_client(tmp_path, "/abs/path", tmp_path / "out")
    data = write_jsonl(tmp_path / "evil.jsonl", [{"text": f"t{i}", "label": "ab"[i % 2], "task": "../up"}
                                                 for i in range(8)])
    with pytest.raises(ConfigError, match="task '../up'"):
        build_clients(build_config(tiny_config(tmp_path, data={"dataset": str(data), "tasks": None})).data, 0)


def test_by_key_clients_are_named_by_their_owner_and_merges_are_reported(tmp_path, caplog):
    records = [{"text": f"t{i}", "label": "ab"[i % 2], "owner": owner} for owner in ["alice", "bob", "Carol D."]
               for i in range(6)]
    data = write_jsonl(tmp_path / "owners.jsonl", records)
    make = lambda n: build_config(tiny_config(tmp_path, data={  # noqa: E731
        "dataset": str(data), "tasks": None, "partition": "by_key", "partition_key": "owner", "clients_per_task": n,
        "train_per_client": 3, "test_per_client": 2})).data
    assert [c.client_id for c in build_clients(make(3), 0)] == ["Carol-D", "alice", "bob"]
    with caplog.at_level(logging.WARNING, logger="fedlora"):
        clients = build_clients(make(2), 0)
    assert [c.client_id for c in clients] == ["task-0", "alice"] and "holds the 2 owners ['Carol D.', 'bob']" in caplog.text


def test_by_key_defaults_to_one_client_per_owner_in_each_task_and_an_error_names_the_task(tmp_path):
    """#38 item 6: one clients_per_task for all tasks could not give tasks with 3 and 1 owners one client each."""
    owners = {"qa": ["alice", "bob", "carol"], "chat": ["dave"]}
    records = [{"text": f"{task} {o} {i}", "label": "ab"[i % 2], "owner": o, "task": task}
               for task, names in owners.items() for o in names for i in range(6)]
    data = write_jsonl(tmp_path / "owners.jsonl", records)
    make = lambda **d: build_config(tiny_config(tmp_path, data={  # noqa: E731
        "dataset": str(data), "tasks": None, "partition": "by_key", "partition_key": "owner", "clients_per_task": None,
        "train_per_client": 3, "test_per_client": 2, **d})).data
    assert [c.client_id for c in build_clients(make(), 0)] == ["chat-dave", "qa-alice", "qa-bob", "qa-carol"]
    with pytest.raises(DataError, match=r"task 'chat' has 1 distinct 'owner' value\(s\), too few for "
                                        r"data.clients_per_task=2 clients; lower it, or leave it unset"):
        build_clients(make(clients_per_task=2), 0)


def test_a_non_utf8_byte_names_the_file_and_line(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(b'{"text": "ok", "label": "a"}\n{"text": "caf\xe9", "label": "b"}\n')
    with pytest.raises(DataError, match=r"latin1.jsonl:2 is not UTF-8 text .* column 14.*iconv"):
        build_clients(build_config(tiny_config(tmp_path, data={"dataset": str(path), "tasks": None})).data, 0)


def test_labels_that_differ_only_in_type_are_refused_not_merged(tmp_path):
    data = write_jsonl(tmp_path / "mixed.jsonl", [{"text": f"t{i}", "label": [0, "0", 1][i % 3]} for i in range(9)])
    with pytest.raises(DataError, match=r"labels that differ only in type \('0' as int and str\)"):
        build_clients(build_config(tiny_config(tmp_path, data={"dataset": str(data), "tasks": None})).data, 0)


def test_a_max_length_beyond_the_models_positions_is_refused_before_round_0(tmp_path):
    with pytest.raises(ConfigError, match=r"data.max_length=100000 exceeds .*256 positions.*at most 256"):
        run_experiment(tiny_config(tmp_path, data={"max_length": 100000}))
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
