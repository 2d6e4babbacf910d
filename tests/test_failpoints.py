"""tokenmill.common.failpoints: spec parsing, what each action does when hit, and that the names in
FAILPOINTS and the `failpoints.hit(...)` call sites in the source agree."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tokenmill.common import failpoints
from tokenmill.common.failpoints import ENV, FAILPOINTS, Failpoint, FailpointError

REPO = Path(__file__).resolve().parents[1]
SOURCE_DIRS = ("common", "services")
DEFINITION = REPO / "common" / "failpoints.py"  # its docstring shows the call form; not a call site
HIT_CALL = re.compile(r"""failpoints\.hit\(\s*["']([^"']+)["']""")
CHILD_TIMEOUT_S = 60


@pytest.fixture(autouse=True)
def disarmed() -> Iterator[None]:
    """Every test starts and ends with nothing armed in this process."""
    failpoints.arm(None)
    yield
    failpoints.arm(None)


# --------------------------------------------------------------------------- parsing


def test_an_empty_spec_arms_nothing():
    assert failpoints.parse("") == {}
    assert failpoints.parse("  \n") == {}


def test_a_valid_spec_parses_every_setting():
    raw = (
        '{"checkpoint.before_manifest": {"action": "pause", "marker": "/tmp/reached"},'
        ' "trainer.after_step": {"action": "kill", "when": {"step": 4, "rank": 1}}}'
    )
    assert failpoints.parse(raw) == {
        "checkpoint.before_manifest": Failpoint("checkpoint.before_manifest", "pause", "/tmp/reached"),
        "trainer.after_step": Failpoint("trainer.after_step", "kill", "", {"step": 4, "rank": 1}),
    }


@pytest.mark.parametrize(
    ("raw", "problem"),
    [
        ("{not json", f"{ENV} is not JSON"),
        ('["trainer.loss"]', "must be a JSON object"),
        ('{"trainer.nope": {"action": "kill"}}', "unknown failpoint 'trainer.nope'"),
        ('{"trainer.loss": {"action": "explode"}}', "trainer.loss needs an 'action'"),
        ('{"trainer.loss": {"marker": "/tmp/x"}}', "trainer.loss needs an 'action'"),
        ('{"trainer.loss": "kill"}', "trainer.loss needs an 'action'"),
        ('{"trainer.loss": {"action": "trigger", "when": [4]}}', "trainer.loss.when must be an object"),
        ('{"trainer.loss": {"action": "trigger", "wehn": {}}}', "unknown settings ['wehn']"),
    ],
)
def test_a_malformed_spec_is_refused_naming_the_problem(raw: str, problem: str):
    with pytest.raises(ValueError) as excinfo:
        failpoints.parse(raw)
    assert problem in str(excinfo.value)


def test_an_unknown_failpoint_lists_the_known_ones():
    with pytest.raises(ValueError) as excinfo:
        failpoints.parse('{"trainer.nope": {"action": "kill"}}')
    for name in FAILPOINTS:
        assert name in str(excinfo.value)


def test_arm_and_env_value_validate_the_spec():
    bad = {"trainer.loss": {"action": "explode"}}
    with pytest.raises(ValueError, match="needs an 'action'"):
        failpoints.arm(bad)
    with pytest.raises(ValueError, match="needs an 'action'"):
        failpoints.env_value(bad)
    good = {"trainer.loss": {"action": "trigger"}}
    assert failpoints.parse(failpoints.env_value(good)) == {
        "trainer.loss": Failpoint("trainer.loss", "trigger")
    }


# --------------------------------------------------------------------------- hit, in this process


def test_hit_is_a_no_op_when_nothing_is_armed():
    for name in FAILPOINTS:  # pause and kill included: nothing armed, so nothing happens
        assert failpoints.hit(name, step=1, rank=0, attempt=1) is False


def test_hit_ignores_failpoints_that_are_not_armed():
    failpoints.arm({"trainer.loss": {"action": "raise"}})
    assert failpoints.hit("trainer.after_step", step=1) is False


def test_trigger_returns_true_only_where_when_matches():
    failpoints.arm({"trainer.loss": {"action": "trigger", "when": {"step": 4, "rank": 1}}})
    assert failpoints.hit("trainer.loss", step=4, rank=1, attempt=1) is True
    assert failpoints.hit("trainer.loss", step=4, rank=0, attempt=1) is False
    assert failpoints.hit("trainer.loss", step=3, rank=1, attempt=1) is False
    assert failpoints.hit("trainer.loss", step=4) is False  # a key the call site does not pass
    assert failpoints.hit("trainer.loss") is False


def test_trigger_without_when_fires_on_every_hit():
    failpoints.arm({"trainer.loss": {"action": "trigger"}})
    assert failpoints.hit("trainer.loss") is True
    assert failpoints.hit("trainer.loss", step=9) is True


def test_raise_raises_failpoint_error_where_when_matches():
    failpoints.arm({"checkpoint.manifest_temp": {"action": "raise", "when": {"attempt": 2}}})
    assert failpoints.hit("checkpoint.manifest_temp", attempt=1) is False
    with pytest.raises(FailpointError, match="checkpoint.manifest_temp"):
        failpoints.hit("checkpoint.manifest_temp", attempt=2)


def test_arm_none_disarms():
    failpoints.arm({"trainer.loss": {"action": "trigger"}})
    failpoints.arm(None)
    assert failpoints.hit("trainer.loss") is False


# --------------------------------------------------------------------------- kill and pause, in a child

CHILD = """
import sys
from tokenmill.common import failpoints
failpoints.hit(sys.argv[1], step=int(sys.argv[2]))
print("survived", flush=True)
"""


def _child_env(spec: dict[str, object]) -> dict[str, str]:
    return {**os.environ, ENV: failpoints.env_value(spec)}


def test_kill_sigkills_the_process_where_when_matches():
    env = _child_env({"trainer.after_step": {"action": "kill", "when": {"step": 4}}})
    fired = subprocess.run(
        [sys.executable, "-c", CHILD, "trainer.after_step", "4"],
        env=env,
        capture_output=True,
        text=True,
        timeout=CHILD_TIMEOUT_S,
    )
    assert fired.returncode == -signal.SIGKILL, fired.stderr
    assert "survived" not in fired.stdout

    missed = subprocess.run(
        [sys.executable, "-c", CHILD, "trainer.after_step", "3"],
        env=env,
        capture_output=True,
        text=True,
        timeout=CHILD_TIMEOUT_S,
    )
    assert missed.returncode == 0, missed.stderr
    assert "survived" in missed.stdout


def test_pause_writes_the_marker_and_waits_until_killed(tmp_path: Path):
    marker = tmp_path / "reached"
    env = _child_env({"checkpoint.before_manifest": {"action": "pause", "marker": str(marker)}})
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, "checkpoint.before_manifest", "0"],
        env=env,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + CHILD_TIMEOUT_S
        while not marker.exists():
            assert child.poll() is None, f"child exited with {child.returncode} before pausing"
            assert time.monotonic() < deadline, "the marker never appeared"
            time.sleep(0.02)
        assert marker.read_text() == "checkpoint.before_manifest"
        time.sleep(0.5)
        assert child.poll() is None, "a paused process must keep waiting"
    finally:
        child.kill()
        stdout, _ = child.communicate(timeout=CHILD_TIMEOUT_S)
    assert child.returncode == -signal.SIGKILL
    assert "survived" not in stdout


# --------------------------------------------------------------------------- call sites


def _hit_call_sites() -> dict[str, list[str]]:
    """Failpoint name -> the `file:line`s in common/ and services/ that call `failpoints.hit` with it."""
    sites: dict[str, list[str]] = {}
    for folder in SOURCE_DIRS:
        for path in sorted((REPO / folder).rglob("*.py")):
            if path == DEFINITION:
                continue
            text = path.read_text(encoding="utf-8")
            for match in HIT_CALL.finditer(text):
                line = text.count("\n", 0, match.start()) + 1
                sites.setdefault(match.group(1), []).append(f"{path.relative_to(REPO)}:{line}")
    return sites


def test_every_call_site_names_a_listed_failpoint():
    unknown = {name: where for name, where in _hit_call_sites().items() if name not in FAILPOINTS}
    assert not unknown, f"failpoints.hit() names missing from FAILPOINTS: {unknown}"


def test_every_listed_failpoint_has_a_call_site():
    unused = sorted(set(FAILPOINTS) - set(_hit_call_sites()))
    assert not unused, f"FAILPOINTS entries no code hits: {unused}"
