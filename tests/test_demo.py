"""`make demo` end to end, at a depth and step count small enough for CI."""

import pytest

from odenets_fast import demo


def test_demo_trains_and_reports(capsys):
    results = demo.main(["--steps", "40", "--depth", "16"])
    out = capsys.readouterr().out
    for label in ("loss at start", "time per step", "backprop / adjoint memory", "last_drift", "gradient error W",
                  "depth smoothness"):  # fmt: skip
        assert label in out
    assert results["loss_end"] < results["loss_start"]
    # x_0 and x_L only, against x_0 … x_15, x itself (kept for a double backward) and a 4-byte stand-in for x_L
    assert results["activation_bytes_backprop"] == 17 * results["activation_bytes_adjoint"] // 2 + 4
    assert 0 < results["last_drift"] < 1e-2
    assert 0 < results["gradient_error"]["W"] < 1e-2



def test_demo_prints_a_small_memory_ratio_with_a_decimal(capsys):
    """At L = 2 backprop keeps 1.5× adjoint's bytes (x_0, x_1 and x against x_0 and x_2): printed as 2x before."""
    demo.main(["--steps", "1", "--depth", "2"])
    (line,) = [line for line in capsys.readouterr().out.splitlines() if line.startswith("backprop / adjoint memory")]
    assert line.split()[-1] == "1.5x"


@pytest.mark.parametrize("argument", ["--steps", "--depth"])
@pytest.mark.parametrize("value", ["0", "-3", "many"])
def test_demo_rejects_counts_below_one(argument, value, capsys):
    """--steps 0 crashed with statistics.StatisticsError (the median of no step times)."""
    with pytest.raises(SystemExit) as raised:
        demo.main([argument, value])
    assert raised.value.code == 2
    assert f"argument {argument}: must be a positive integer; got {value!r}" in capsys.readouterr().err
