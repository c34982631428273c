"""The output comparator every parity and agreement gate goes through."""

from __future__ import annotations

import numpy as np
import pytest

from edgeq.core.compare import Tolerance, compare_output, compare_outputs, range_step, step_tolerance


def _logits(n: int = 8, classes: int = 10, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, classes)).astype(np.float32)


def test_record_names_the_output_the_worst_sample_and_the_tolerance():
    ref = _logits()
    got = ref.copy()
    got[5, 2] += 0.25  # sample 5 is the worst
    got[1, 0] += 0.01
    [rec] = compare_outputs({"logits": ref}, {"logits": got}, Tolerance.absolute(0.1), labels=("PyTorch", "ONNX"))
    assert rec.output == "logits" and rec.samples == 8
    assert rec.worst_sample == 5
    assert rec.max_abs_diff == pytest.approx(0.25, rel=1e-6)
    assert rec.tolerance == 0.1 and not rec.passed and rec.error == ""
    assert rec.top1_agreement is not None


def test_each_output_takes_its_own_tolerance():
    ref = {"logits": _logits(), "embedding": _logits(seed=1)}
    got = {"logits": ref["logits"] + 0.05, "embedding": ref["embedding"] + 0.05}
    recs = compare_outputs(ref, got, {"logits": Tolerance.absolute(0.1), "embedding": Tolerance.absolute(0.01)})
    assert {r.output: r.passed for r in recs} == {"logits": True, "embedding": False}


def test_shape_mismatch_is_refused_with_both_shapes():
    [rec] = compare_outputs({"logits": _logits(8, 10)}, {"logits": _logits(8, 9)}, Tolerance.absolute(1.0),
                            labels=("PyTorch", "ONNX"))
    assert not rec.passed and rec.max_abs_diff is None
    assert rec.error == "output 'logits': PyTorch shape (8, 10) != ONNX shape (8, 9)"


def test_nan_is_refused_naming_the_output_and_the_sample():
    ref = _logits()
    got = ref.copy()
    got[3, 4] = np.nan
    [rec] = compare_outputs({"logits": ref}, {"logits": got}, Tolerance.absolute(np.inf), labels=("PyTorch", "ONNX"))
    assert not rec.passed  # even an unlimited tolerance does not pass a NaN
    assert "output 'logits'" in rec.error and "ONNX has 1 non-finite value" in rec.error and "sample 3" in rec.error


def test_a_missing_output_fails_naming_it():
    [rec] = compare_outputs({"logits": _logits()}, {}, Tolerance.absolute(1.0), labels=("PyTorch", "ONNX"))
    assert not rec.passed and rec.error == "output 'logits' is missing from the ONNX outputs"


@pytest.mark.parametrize("off_by_steps, passed", [(2, True), (4, False)])
def test_tolerance_in_quantization_steps(off_by_steps, passed):
    ref = _logits()
    step = range_step(ref)
    got = ref.copy()
    got[0, 0] += off_by_steps * step
    rec = compare_output("logits", ref, got, Tolerance.in_steps(3, step))
    assert rec.passed is passed
    assert rec.step == step and rec.tolerance == pytest.approx(3 * step)
    assert rec.steps == pytest.approx(off_by_steps, rel=1e-4)


def test_the_step_is_the_callers_choice():
    ref = _logits()
    got = ref + 0.02
    assert compare_output("logits", ref, got, Tolerance.in_steps(3, 0.01)).passed
    assert not compare_output("logits", ref, got, Tolerance.in_steps(3, 0.001)).passed


def test_agreement_counts_the_confident_samples_and_reports_near_ties():
    ref = np.array([[0.0, 1.0], [0.0, 1.0], [0.0, 1.0], [0.50, 0.51]], dtype=np.float32)
    got = ref.copy()
    got[3] = [0.51, 0.50]  # a near tie flipped: its top-1 margin (0.01) is within the tolerance
    rec = compare_output("p", ref, got, Tolerance.absolute(0.02, min_top1=0.99))
    assert rec.top1_agreement == 0.75  # over every sample, reported
    assert rec.confident_samples == 3 and rec.confident_top1_agreement == 1.0 and rec.near_ties == 1
    assert rec.within_tolerance and rec.agreement_ok and rec.passed


def test_max_abs_beyond_the_steps_fails_alone_with_agreement_intact():
    ref = _logits(64)
    got = ref + 4 * 0.01  # every value 4 steps off, every ranking kept
    rec = compare_output("logits", ref, got, Tolerance.in_steps(3, 0.01, min_top1=0.99))
    assert not rec.passed and rec.within_tolerance is False
    assert rec.top1_agreement == 1.0 and rec.confident_top1_agreement == 1.0 and rec.agreement_ok is True
    assert rec.steps == pytest.approx(4, rel=1e-4)


def test_a_confident_sample_flipped_within_the_tolerance_fails_the_agreement_clause_alone():
    ref = np.tile(np.array([[2.0, 1.5, 0.0]], np.float32), (10, 1))  # top-1 margin 0.5 everywhere
    got = ref.copy()
    got[7, 0] -= 0.26  # best and runner-up swap, neither moving by more than the tolerance
    got[7, 1] += 0.26
    rec = compare_output("logits", ref, got, Tolerance.absolute(0.3, min_top1=0.99))
    assert rec.within_tolerance and rec.max_abs_diff == pytest.approx(0.26, rel=1e-5)
    assert rec.confident_samples == 10 and rec.confident_top1_agreement == 0.9 and rec.near_ties == 0
    assert rec.agreement_ok is False and not rec.passed


def test_the_floor_is_the_least_tolerance_and_the_whole_one_without_a_step():
    assert Tolerance.in_steps(3, 0.001, floor=0.01).limit == 0.01
    assert Tolerance.in_steps(3, 0.1, floor=0.01).limit == pytest.approx(0.3)
    assert step_tolerance(3, None, 0.05, min_top1=0.99) == Tolerance.absolute(0.05, min_top1=0.99)
    assert step_tolerance(3, 0.1, 0.05).limit == pytest.approx(0.3)


def test_top1_is_left_out_where_a_sample_has_one_value():
    rec = compare_output("score", np.zeros((4, 1), np.float32), np.zeros((4, 1), np.float32), Tolerance.absolute(0.0))
    assert rec.top1_agreement is None and rec.passed


def test_a_tolerance_too_coarse_for_most_samples_holds_top1_on_every_sample():
    """One output step wider than the outputs' range leaves no sample confident: the agreement clause then holds
    every sample, so outputs from the wrong samples (within the range, within the tolerance) fail it."""
    ref = _logits(32) * 3
    coarse = Tolerance.in_steps(3, float(ref.max() - ref.min()), min_top1=0.99)
    wrong = compare_output("logits", ref, ref[::-1].copy(), coarse)
    assert wrong.within_tolerance and wrong.confident_samples == 0 and wrong.agreement_on_all
    assert wrong.agreement_ok is False and not wrong.passed and wrong.top1_agreement < 0.5
    close = compare_output("logits", ref, ref + 0.01, coarse)
    assert close.agreement_on_all and close.top1_agreement == 1.0 and close.passed
    fine = compare_output("logits", ref, ref[::-1].copy(), Tolerance.absolute(1e-3, min_top1=0.99))
    assert not fine.agreement_on_all  # most samples confident: the clause is on them, as before
