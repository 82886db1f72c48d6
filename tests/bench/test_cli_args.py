"""Bad flags of `python -m bench run` are refused with the flag named, before anything
starts: each of these once crashed a run half-way, or ran and measured nothing."""

from __future__ import annotations

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
