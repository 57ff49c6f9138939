"""The documentation stays true: the README's API tour runs and shows what it says, every link between
the documents resolves, the environment-variable table names every variable the code reads, and the
predicted GPU times are the planner's."""

import ast
import inspect
import re
from pathlib import Path

import torch

import odenets_fast
from odenets_fast import AdjointResidualStack, plan

ROOT = Path(__file__).resolve().parents[1]
DOCUMENTS = [ROOT / "README.md", ROOT / "DESIGN.md", ROOT / "CHANGELOG.md", ROOT / "bench" / "README.md",
             *sorted((ROOT / "docs").glob("*.md"))]  # fmt: skip


def test_readme_api_tour_runs_and_measures_something():
    """The tour's blocks, verbatim, in one namespace: non-zero drift and gradient error (an init whose V
    is zero would print zeros and make the diagnostics look broken), the controller placing stored
    states, convert replacing the blocks by one stack that trains."""
    readme = (ROOT / "README.md").read_text()
    tour = readme.split("## API tour", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", tour, flags=re.S)
    assert len(blocks) == 3
    namespace = {}
    torch.manual_seed(0)
    for i, block in enumerate(blocks):
        exec(compile(block, f"README.md (API tour, block {i + 1})", "exec"), namespace)
    assert 0 < namespace["model"].last_drift < 1e-3
    assert 0 < namespace["err"]["W"] < 1e-3
    assert namespace["out"].shape == namespace["x"].shape
    stack = namespace["stack"]
    assert 1 < len(stack.anchor_positions) < stack.depth
    assert all(drift <= stack.drift_tol for _, _, drift in stack.last_segment_drift)
    net = namespace["net"]
    assert isinstance(net[1], AdjointResidualStack) and len(net[1].blocks) == 16
    assert all(p.grad is not None for p in net.parameters())


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _anchors(path: Path) -> set:
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)
    return {_slug(h) for h in re.findall(r"^#+ (.+)$", text, flags=re.M)}


def test_every_relative_link_resolves():
    broken = []
    for doc in DOCUMENTS:
        for target in re.findall(r"\]\(([^)\s]+)\)", doc.read_text()):
            if re.match(r"[a-z]+://", target):
                continue
            file, _, anchor = target.partition("#")
            path = (doc.parent / file).resolve() if file else doc
            if not path.exists():
                broken.append(f"{doc.name}: {target} (no such file)")
            elif anchor and path.suffix == ".md" and anchor not in _anchors(path):
                broken.append(f"{doc.name}: {target} (no such heading)")
    assert not broken, broken


def test_environment_table_names_every_variable_the_code_reads():
    sources = [*ROOT.joinpath("odenets_fast").rglob("*.py"), *ROOT.joinpath("triton_kernels").rglob("*.py"),
               *ROOT.joinpath("bench").rglob("*.py"), ROOT / "setup.py", *ROOT.joinpath("csrc").glob("*")]  # fmt: skip
    used = {name for path in sources for name in re.findall(r"ODENETS_FAST_[A-Z_]*[A-Z]", path.read_text())}
    table = (ROOT / "docs" / "environment.md").read_text()
    documented = set(re.findall(r"^\| `(ODENETS_FAST_[A-Z_]+)`", table, flags=re.M))
    assert used - {"ODENETS_FAST_TRITON"}, "no variable found: the scan is broken"
    assert used - {"ODENETS_FAST_TRITON"} <= documented, sorted(used - documented)
    assert documented <= used, f"documented but read nowhere: {sorted(documented - used)}"
    for name, reader in re.findall(r"^\| `(ODENETS_FAST_[A-Z_]+)` \| `([\w.]+)`", table, flags=re.M):
        path = ROOT / (reader if reader.endswith(".py") else reader.replace(".", "/") + ".py")
        assert name in path.read_text(), f"{name}: the table says {reader} reads it"


def test_the_predicted_gpu_table_is_what_plan_predicts():
    """docs/triton.md's table of predicted H100 times is `plan`'s output at this commit, to its two
    decimals: a change to the cost model or the kernels' schedule must carry the table with it."""
    text = (ROOT / "docs" / "triton.md").read_text()
    rows = re.findall(r"^\| (?:wide|narrow) (\w+) \((\d+), (\d+), (\d+), (\d+)\) \| (\w+) \| (.*) \|$", text, re.M)
    assert len(rows) == 4
    for precision, B, q, m, L, chosen, cells in rows:
        dtype = torch.bfloat16 if precision == "bfloat16" else torch.float32
        input_precision = "tf32" if precision == "TF32" else None
        got = plan(int(B), int(q), int(m), int(L), dtype=dtype, input_precision=input_precision, device="H100")
        times = [f"{e.forward_ms:.2f} / {e.step_ms:.2f}" for e in (got.estimates[k] for k in ("layered", "fused", "eager"))]
        assert cells.split(" | ") == [*times, f"{got.ratio():.2f}"], (precision, B, q, m, L)
        assert chosen == got.path


def test_the_documented_signatures_are_the_code_s():
    """docs/integration.md's signatures of the public entry points: every argument, in order, with
    its default."""
    text = (ROOT / "docs" / "integration.md").read_text()
    signatures = dict(re.findall(r"^- `(\w+)\((.*?)\)`", text, flags=re.M | re.S))
    assert {"ode_mlp", "ODEMLP", "AdjointResidualStack", "convert"} <= set(signatures)
    for name, documented in signatures.items():
        args = ast.parse(f"def f({documented}): pass").body[0].args
        positional = args.args[len(args.args) - len(args.defaults):]
        doc_defaults = {a.arg: ast.literal_eval(d) for a, d in zip(positional, args.defaults)}
        doc_defaults.update({a.arg: ast.literal_eval(d) for a, d in zip(args.kwonlyargs, args.kw_defaults) if d})
        parameters = inspect.signature(getattr(odenets_fast, name)).parameters
        assert [a.arg for a in args.args + args.kwonlyargs] == list(parameters), name
        code_defaults = {k: p.default for k, p in parameters.items() if p.default is not inspect.Parameter.empty}
        assert doc_defaults == code_defaults, name
