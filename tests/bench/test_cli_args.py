"""Bad flags of `python -m bench run` are refused with the flag named, before anything
starts: each of these once crashed a run half-way, or ran and measured nothing."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.__main__ import main
from bench.scenarios import Options


@pytest.mark.parametrize(("flags", "message"), [
    (["--nodes", "0"], "--nodes must be a number of at least 1, not 0"),
    (["--workers", "0"], "--workers must be a number of at least 1, not 0"),
    (["--rooms", "0"], "--rooms must be a number of at least 1, not 0"),
    (["--members", "1"], "--members must be a number of at least 2, not 1"),
    (["--duration", "0"], "--duration must be a finite number above 0, not 0"),
    (["--duration", "-1"], "--duration must be a finite number above 0, not -1"),
    (["--duration", "nan"], "--duration must be a finite number above 0, not nan"),
    (["--duration", "inf"], "--duration must be a finite number above 0, not inf"),
    (["--slo-ms", "-1"], "--slo-ms must be a finite number above 0, not -1"),
    (["--drain", "-1"], "--drain must be a number of at least 0, not -1"),
    (["--receipts-ms", "-5"], "--receipts-ms must be a number of at least 0, not -5"),
    (["--half-steps", "-1"], "--half-steps must be a number of at least 0, not -1"),
    (["--body-chars", "0"], "--body-chars must be a number of at least 1, not 0"),
    (["--warmup", "100"], "--warmup (100 s) must be shorter than --duration (6 s)"),
    (["--quick", "--warmup", "2"], "--warmup (2 s) must be shorter than --duration (1.5 s)"),
    (["--body-chars", "100000"], "--body-chars 100000 is over chatd's limits.max_body_chars "
                                 "(4000)"),
    (["--chatd-env", "CHATD_LIMITS__NOPE=1"], "--chatd-env: unknown config key limits.nope"),
    (["--chatd-env", "CHATD_LIMITS__SEND_BURST=abc"],
     "--chatd-env: limits.send_burst (from CHATD_LIMITS__SEND_BURST): expected an integer"),
])
def test_a_bad_flag_is_a_usage_error(flags: list[str], message: str,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["run", "--scenario", "rooms", "--no-peer", *flags])
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err


def test_a_body_over_the_default_limit_is_fine_once_chatd_takes_it() -> None:
    opts = Options(scenario="rooms", command="", body_chars=5000,
                   chatd_env={"CHATD_LIMITS__MAX_BODY_CHARS": "6000"})
    assert opts.body_chars == 5000


def test_the_peers_alone_are_not_held_to_chatd_s_limits() -> None:
    opts = Options(scenario="rooms", command="", body_chars=100_000, chatd=False)
    assert not opts.chatd


def test_results_that_could_not_be_written_stop_the_run_before_it_starts(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    taken = tmp_path / "a-file"
    taken.write_text("")
    with pytest.raises(SystemExit) as exit_:
        main(["run", "--scenario", "rooms", "--no-peer", "--results-dir", str(taken)])
    assert exit_.value.code == 2
    assert f"--results-dir: cannot create {taken}" in capsys.readouterr().err


@pytest.mark.parametrize(("content", "message"), [
    (None, "No such file or directory"),
    ("not json", "is not a results file of python -m bench run (JSONDecodeError"),
    ('{"a": 1}', "is not a results file of python -m bench run (TypeError"),
    ('[{"scenario": "rooms"}]', "is not a results file of python -m bench run (KeyError"),
])
def test_chart_of_something_else_than_results_is_a_usage_error(
        tmp_path: Path, content: str | None, message: str,
        capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "results.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(SystemExit) as exit_:
        main(["chart", str(path)])
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err
