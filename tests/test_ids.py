"""Unit tests for ccr.ids (job/step ids, checkpoint names) and ccr.errors.exit_code_for."""

from __future__ import annotations

import pytest

from ccr import errors
from ccr.errors import UsageError, exit_code_for
from ccr.ids import (
    JobRef,
    StepId,
    checkpoint_name,
    output_name,
    parse_job_ref,
    parse_step_id,
)

# parse_job_ref ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "job", "step"),
    [
        ("0", 0, None),
        ("1", 1, None),
        ("42", 42, None),
        ("42.0", 42, 0),
        ("42.7", 42, 7),
        ("0.0", 0, 0),
        ("007", 7, None),
        ("007.010", 7, 10),
        ("999999999", 999999999, None),
        ("999999999.999999999", 999999999, 999999999),
        (" 12.3 ", 12, 3),
        ("12\n", 12, None),
    ],
)
def test_parse_job_ref_valid(text: str, job: int, step: int | None) -> None:
    ref = parse_job_ref(text)
    assert ref == JobRef(job, step)
    assert ref.job_id == job
    assert ref.step_id == step
    assert isinstance(ref.job_id, int)


@pytest.mark.parametrize(
    "text",
    [
        "",
        " ",
        "abc",
        "1.x",
        "x.1",
        "1.",
        ".1",
        "1..2",
        "1.2.3",
        "-1",
        "1.-2",
        "+1",
        "1e3",
        "0x10",
        "1 .2",
        "1. 2",
        "1,2",
        "1_000",
        "١٢",  # non-ASCII digits are not job ids
        "1" * 30,  # would overflow the registry's 64-bit integers
        "1." + "2" * 30,
        "1/2",
        "1;rm -rf /",
    ],
)
def test_parse_job_ref_malformed(text: str) -> None:
    with pytest.raises(UsageError) as info:
        parse_job_ref(text)
    message = str(info.value)
    assert "malformed job id" in message
    assert repr(text) in message
    assert "\n" not in message
    assert exit_code_for(info.value) == 2


def test_parse_job_ref_str_roundtrip() -> None:
    for text in ("5", "5.0", "123.45"):
        assert str(parse_job_ref(text)) == text
    assert str(parse_job_ref("007.01")) == "7.1"


def test_job_ref_step_property() -> None:
    assert parse_job_ref("3").step is None
    step = parse_job_ref("3.4").step
    assert step == StepId(3, 4)
    assert isinstance(step, StepId)


# parse_step_id ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "job", "step"),
    [("1.0", 1, 0), ("42.3", 42, 3), ("0.0", 0, 0), ("09.08", 9, 8)],
)
def test_parse_step_id_valid(text: str, job: int, step: int) -> None:
    sid = parse_step_id(text)
    assert sid == StepId(job, step)
    assert str(sid) == f"{job}.{step}"


@pytest.mark.parametrize("text", ["1", "42", "0"])
def test_parse_step_id_rejects_bare_job(text: str) -> None:
    with pytest.raises(UsageError, match="malformed step id"):
        parse_step_id(text)


@pytest.mark.parametrize("text", ["", "abc", "1.x", "1.2.3", "-1.0", "1."])
def test_parse_step_id_malformed(text: str) -> None:
    with pytest.raises(UsageError):
        parse_step_id(text)


def test_step_ids_order_numerically() -> None:
    ids = [StepId(10, 0), StepId(2, 10), StepId(2, 9), StepId(1, 100)]
    assert sorted(ids) == [StepId(1, 100), StepId(2, 9), StepId(2, 10), StepId(10, 0)]


# names -----------------------------------------------------------------------------------


def test_checkpoint_name_job_and_step() -> None:
    assert checkpoint_name(JobRef(42)) == "42.ckpt"
    assert checkpoint_name(JobRef(42, 0)) == "42.0.ckpt"
    assert checkpoint_name(StepId(42, 3)) == "42.3.ckpt"
    assert checkpoint_name(parse_job_ref("007.01")) == "7.1.ckpt"
    assert checkpoint_name(parse_job_ref("8")) == "8.ckpt"


def test_output_name() -> None:
    assert output_name(StepId(42, 0)) == "ccr-42.0.out"
    assert output_name(parse_step_id("3.12")) == "ccr-3.12.out"


# exit codes ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cls", "code"),
    [
        (errors.CcrError, 1),
        (errors.UsageError, 2),
        (errors.NotFoundError, 3),
        (errors.JobStateError, 4),
        (errors.CriuError, 5),
        (errors.MaxWaitExceeded, 6),
        (errors.IntegrityError, 7),
        (errors.StorageError, 8),
        (errors.PermissionDeniedError, 9),
        (errors.GpuError, 10),
    ],
)
def test_exit_code_for_each_error(cls: type[errors.CcrError], code: int) -> None:
    assert exit_code_for(cls("boom")) == code
    assert cls.exit_code == code


def test_exit_codes_are_distinct_and_nonzero() -> None:
    codes = [cls.exit_code for cls in errors.ERROR_CLASSES]
    assert len(codes) == len(set(codes))
    assert all(0 < c < 64 for c in codes)
    assert errors.EXIT_VACATED not in codes and errors.EXIT_INTERNAL not in codes


def test_exit_code_for_subclass_uses_nearest_ancestor() -> None:
    class TooBig(errors.StorageError):
        pass

    class Weird(errors.CcrError):
        pass

    assert exit_code_for(TooBig("x")) == 8
    assert exit_code_for(Weird("x")) == 1


@pytest.mark.parametrize(
    "exc", [ValueError("x"), RuntimeError("x"), KeyboardInterrupt(), OSError(2, "nope")]
)
def test_exit_code_for_foreign_errors_is_one(exc: BaseException) -> None:
    assert exit_code_for(exc) == 1


def test_criu_error_names_log() -> None:
    err = errors.CriuError("CRIU dump failed: x", "/var/log/dump.log")
    assert str(err) == "CRIU dump failed: x (CRIU log: /var/log/dump.log)"
    assert err.log_path == "/var/log/dump.log"
    assert exit_code_for(err) == 5
    plain = errors.CriuError("CRIU restore failed")
    assert str(plain) == "CRIU restore failed"
    assert plain.log_path is None
