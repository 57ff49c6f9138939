"""`make demo` end to end, at a depth and step count small enough for CI."""

from pathlib import Path

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


def test_readme_api_snippet_runs_and_measures_something(capsys):
    """The README's API example, verbatim: it must run and show a non-zero drift and gradient error
    (an init whose V is zero would print zeros and make the diagnostics look broken)."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    snippet = readme.split("## API", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    namespace = {}
    exec(compile(snippet, "README.md (API)", "exec"), namespace)
    assert 0 < namespace["model"].last_drift < 1e-3
    assert 0 < namespace["err"]["W"] < 1e-3
    assert namespace["out"].shape == namespace["x"].shape
