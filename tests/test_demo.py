"""`make demo` end to end, at a depth and step count small enough for CI."""

from odenets_fast import demo


def test_demo_trains_and_reports(capsys):
    results = demo.main(["--steps", "40", "--depth", "16"])
    out = capsys.readouterr().out
    for label in ("loss at start", "time per step", "backprop / adjoint memory", "last_drift", "gradient error W",
                  "depth smoothness"):  # fmt: skip
        assert label in out
    assert results["loss_end"] < results["loss_start"]
    # x_0 and x_L only, against all 17 states and x itself (kept for a double backward)
    assert results["activation_bytes_backprop"] == 18 * results["activation_bytes_adjoint"] // 2
    assert 0 < results["last_drift"] < 1e-2
    assert 0 < results["gradient_error"]["W"] < 1e-2

