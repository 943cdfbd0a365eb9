"""The device-equivalence check (GPU check's ``equivalence`` section) on the CPU: both sides
agree exactly when they run the same path, and a layer that computes differently on the
"device" side is named by the op tracer where the difference starts."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from hmaml.bench import equivalence
from hmaml.bench.equivalence import OpRecord, compare_traces, op_difference
from tests.train_fixtures import tiny_pack

__all__ = ["tiny_pack"]  # the fixture, re-exported for pytest


@pytest.fixture(scope="module")
def packs(tiny_pack: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("eqpacks")
    for name in ("omniglot_nolatin", "emnist"):  # the glyph pack has all three splits
        (folder / name).symlink_to(tiny_pack)
    return folder


def only(name: str) -> equivalence.EquivalenceSizes:
    sizes = equivalence.SMOKE
    return dataclasses.replace(sizes, cases={name: sizes.cases[name]})


def test_the_same_path_on_both_sides_agrees_exactly(packs: Path) -> None:
    report = equivalence.run(torch.device("cpu"), packs, equivalence.SMOKE)
    assert report["pass"] and set(report["methods"]) == {"hypermaml", "maml_all", "protonet"}
    phases = report["methods"]["hypermaml"]["float64"]["phases"]
    assert list(phases) == ["warmup (p=1)", "switch (0<p<1)", "p=0"]  # W = 1, S = 3
    for method in report["methods"].values():
        assert method["steps"] == 5
        for phase in method["float64"]["phases"].values():
            assert phase["rel_l2"] == 0.0
            trace = phase["op_trace"]
            assert trace["ops_compared"] == trace["ops"] > 50
            assert trace["first_over_tolerance"] is None
        fp32 = method["fp32"]
        assert 0 < fp32["first_grad_rel"] <= equivalence.FP32_TOLERANCE["first_grad_rel"]
        assert fp32["pass"]


def test_a_layer_that_differs_on_the_device_is_named(packs: Path) -> None:
    def patch(method: torch.nn.Module) -> None:
        method.encoder.blocks[1].bn.eps = 1e-2  # the "device" normalises block 1 differently

    report = equivalence.run(torch.device("cpu"), packs, only("hypermaml"), device_patch=patch)
    float64 = report["methods"]["hypermaml"]["float64"]
    assert not float64["pass"] and not report["pass"]
    for phase in float64["phases"].values():
        first = phase["op_trace"]["first_over_tolerance"]
        assert (first["module"], first["op"]) == ("encoder.blocks.1.bn", "native_batch_norm")
        assert phase["rel_l2"] > equivalence.FLOAT64_TOLERANCE


def test_traces_align_past_an_op_that_only_one_device_runs() -> None:
    def record(op: str, norm: float, projection: float = 0.0) -> OpRecord:
        return OpRecord(op, "m", 4, norm, projection, True)

    reference = [record("convolution", 1.0), record("relu", 2.0), record("sum", 3.0)]
    other = [record("convolution", 1.0), record("copy_", 9.0), record("relu", 2.0),
             record("sum", 3.0, projection=0.3)]
    report = compare_traces(reference, other, tolerance=1e-9)
    assert report["ops_compared"] == 3
    first = report["first_over_tolerance"]
    assert (first["index"], first["op"]) == (2, "sum")
    assert first["rel_diff"] == pytest.approx(0.3 * 12 ** 0.5 / 3.0)


def test_the_summary_sees_a_permutation() -> None:
    """Sums and norms cannot tell a transposed layout; the position-weighted projection can."""
    x = torch.randn(64, 32)
    a = equivalence.summarise("op", "m", x)
    b = equivalence.summarise("op", "m", x.t().contiguous().view(64, 32))
    assert a.norm == pytest.approx(b.norm)
    assert op_difference(a, b) > 0.1
    assert op_difference(a, equivalence.summarise("op", "m", x.clone())) == 0.0
