"""What the command line prints for a person to copy is valid as printed (#37: an experiment named `it's`)."""

from __future__ import annotations

import shlex

import pytest
from flwr.common.config import parse_config_args

from fedlora.cli import main


@pytest.mark.parametrize("name,slug", [("it's", "it-s"), ('say "hi"', "say-hi"), ("two words", "two-words"),
                                       ("plain", "plain"), ("../..", "run")])
def test_the_printed_flwr_run_command_is_one_valid_shell_line_for_any_experiment_name(tmp_path, capsys, name, slug):
    app_dir = tmp_path / "my app"
    assert main(["deploy", "app", str(app_dir), "demo", "--set", f"name={name}"]) == 0
    line = capsys.readouterr().out.split("submit it with: ", 1)[1].split(" (a new or empty", 1)[0]
    words = shlex.split(line)  # a broken quote raises here
    assert words[:2] == ["flwr", "run"] and words[2] == str(app_dir)
    override = words[words.index("-c") + 1]
    assert parse_config_args([override]) == {"set.output_dir": f"/srv/fedlora/runs/{slug}"}


def test_a_full_disk_is_one_error_line_that_says_what_to_do(tmp_path, capsys, monkeypatch):
    """#37: an OSError (disk full) printed a 40-line double traceback on the console."""
    import errno

    import fedlora.api

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "run" / "metrics.jsonl"))

    monkeypatch.setattr(fedlora.api, "run_experiment", full)
    assert main(["run", "demo", "--set", f"output_dir={tmp_path / 'run'}", "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("fedlora: error: No space left on device (")
    assert "--resume" in err[0]
