"""The batched engine: groups give the same steps as one pair at a time, groups may change between
steps, the facade behaves as a torch optimizer (hooks, deepcopy, torch.compile), and the import
graph of the package has no cycle."""

from __future__ import annotations

import ast
import copy
from pathlib import Path

import pytest
import torch
from helpers import full_weight, make_pair, quadratic_loss
from torch import Tensor
from torch.optim.optimizer import register_optimizer_step_pre_hook

import lowrank_opt as lo

# (m, n, r): three pairs of one shape, two of another, and a different rank of the first shape.
SHAPES = [(10, 8, 3), (10, 8, 3), (10, 8, 3), (6, 12, 2), (6, 12, 2), (10, 8, 2)]

RULES = {
    "loft_adamw": (lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1), {}),
    "loft_adamw-factored": (lambda p: torch.optim.AdamW(p, lr=1e-2), {"second_moment": "factored"}),
    "loft_adafactor": (lambda p: torch.optim.Adafactor(p, lr=1e-2), {}),
    "loft_muon": (lambda p: torch.optim.Muon(p, lr=1e-2), {"ns_dtype": "float64"}),
    "generic": (lambda p: torch.optim.SGD(p, lr=1e-2, momentum=0.9), {}),
}


def _pairs(seed: int = 0) -> list[lo.LoRAPair]:
    return [make_pair(m, n, r, scale=1.5, seed=seed + i) for i, (m, n, r) in enumerate(SHAPES)]


def _targets() -> list[Tensor]:
    gen = torch.Generator().manual_seed(99)
    return [torch.randn(m, n, dtype=torch.float64, generator=gen) for m, n, _ in SHAPES]


def _wrapper(name: str, pairs: list[lo.LoRAPair], one_group_each: bool, **options) -> lo.LowRankWrapper:
    make, rule_options = RULES[name]
    params = [f for pair in pairs for f in (pair.a, pair.b)]
    base = make([{"params": [pair.a, pair.b]} for pair in pairs] if one_group_each else params)
    return lo.LowRankWrapper(base, pairs, rule=name.split("-")[0], rule_options=rule_options, **options)


def _run(opt: lo.LowRankWrapper, pairs: list[lo.LoRAPair], steps: int, skip: dict[int, set[int]] | None = None):
    losses = [quadratic_loss(t) for t in _targets()]
    for t in range(steps):
        opt.zero_grad()
        for i, (pair, loss) in enumerate(zip(pairs, losses)):
            if i not in (skip or {}).get(t, set()):
                loss(full_weight(pair)).backward()
        opt.step()


@pytest.mark.parametrize("schedule", ["alternate", "both"])
@pytest.mark.parametrize("name", list(RULES))
def test_groups_agree_with_one_pair_at_a_time(name, schedule):
    """Separate param groups put every pair in a group of its own (G = 1): the same trajectory."""
    grouped, alone = _pairs(), _pairs()
    _run(_wrapper(name, grouped, False, schedule=schedule, max_grad_norm=0.5), grouped, 8)
    _run(_wrapper(name, alone, True, schedule=schedule, max_grad_norm=0.5), alone, 8)
    for p, q in zip(grouped, alone):
        for x, y in ((p.a, q.a), (p.b, q.b)):
            assert (x - y).abs().max() <= 1e-12 * y.abs().max(), name


@pytest.mark.parametrize("name", list(RULES))
def test_a_pair_leaving_and_joining_its_group_changes_nothing_else(name):
    """Pair 1 has no gradient at steps 2 and 3 (it leaves its group, which has G = 2 then, and
    comes back): every pair ends as in runs where it was never grouped with the others."""
    skip = {2: {1}, 3: {1}}
    together = _pairs()
    _run(_wrapper(name, together, False), together, 6, skip)
    for i, (m, n, r) in enumerate(SHAPES):
        alone = [make_pair(m, n, r, scale=1.5, seed=i)]
        losses = [quadratic_loss(_targets()[i])]
        opt = _wrapper(name, alone, False)
        for t in range(6):
            opt.zero_grad()
            if not (t in skip and i in skip[t]):
                losses[0](full_weight(alone[0])).backward()
            opt.step()
        for x, y in ((together[i].a, alone[0].a), (together[i].b, alone[0].b)):
            assert (x - y).abs().max() <= 1e-12 * y.abs().max(), (name, i)


def test_torch_compile_of_the_step_gives_the_eager_step():
    """The step runs eagerly under ``torch.compile`` (its Python decides the grouping), so a
    compiled call moves every pair, of every shape, exactly as an eager one."""
    eager, compiled = _pairs(), _pairs()
    eager_opt = _wrapper("loft_adamw", eager, False)
    compiled_opt = _wrapper("loft_adamw", compiled, False)
    step = torch.compile(compiled_opt.step)
    losses = [quadratic_loss(t) for t in _targets()]
    for _ in range(3):
        for pairs, opt, run in ((eager, eager_opt, eager_opt.step), (compiled, compiled_opt, step)):
            opt.zero_grad()
            for pair, loss in zip(pairs, losses):
                loss(full_weight(pair)).backward()
            run()
    for p, q in zip(eager, compiled):
        assert torch.allclose(full_weight(p), full_weight(q), rtol=1e-6, atol=0)


def test_deepcopy_before_the_first_step():
    pairs = _pairs()
    opt = _wrapper("loft_adamw", pairs, False)
    copy.deepcopy(opt.state_dict())
    twin = copy.deepcopy(opt)
    twin_pairs = twin.pairs
    _run(opt, pairs, 3)
    _run(twin, twin_pairs, 3)
    for p, q in zip(pairs, twin_pairs):
        assert torch.equal(p.a, q.a) and torch.equal(p.b, q.b)


def test_torch_optimizer_hooks_fire_once():
    pairs = _pairs()
    opt = _wrapper("loft_adamw", pairs, False)
    calls: list[str] = []
    handles = [
        register_optimizer_step_pre_hook(lambda o, a, k: calls.append(f"global {type(o).__name__}")),
        opt.register_step_post_hook(lambda o, a, k: calls.append("post")),
        opt.register_load_state_dict_pre_hook(lambda o, sd: calls.append("load pre")),
        opt.register_load_state_dict_post_hook(lambda o: calls.append("load post")),
        opt.register_state_dict_pre_hook(lambda o: calls.append("save pre")),
    ]
    try:
        _run(opt, pairs, 1)
        opt.load_state_dict(opt.state_dict())
    finally:
        for handle in handles:
            handle.remove()
    assert calls == ["global LowRankWrapper", "post", "save pre", "load pre", "load post"]


def _imports(path: Path, module: str) -> set[str]:
    """The modules of ``lowrank_opt`` that ``module`` (at ``path``) imports at run time, not under TYPE_CHECKING."""
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and getattr(node.test, "id", "") == "TYPE_CHECKING":
            node.body = []
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package
            for _ in range(node.level - 1):
                base = base.rpartition(".")[0]
            found.add(f"{base}.{node.module}" if node.module else base)
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("lowrank_opt"):
            found.add(node.module)  # type: ignore[arg-type]
    return found


def test_the_import_graph_has_no_cycle_and_strategies_do_not_import_the_wrapper():
    root = Path(lo.__file__).parent
    graph = {}
    for path in root.rglob("*.py"):
        name = ".".join(("lowrank_opt", *path.relative_to(root).with_suffix("").parts)).removesuffix(".__init__")
        graph[name] = {m for m in _imports(path, name) if m != name}
    for name, targets in graph.items():
        if name.startswith("lowrank_opt.distributed"):
            assert "lowrank_opt.wrapper" not in targets, name
    state: dict[str, int] = {}

    def visit(node: str, trail: list[str]) -> None:
        if state.get(node) == 1:
            raise AssertionError(f"import cycle: {' -> '.join([*trail, node])}")
        if state.get(node) == 2:
            return
        state[node] = 1
        for target in graph.get(node, ()):
            if target in graph and target != "lowrank_opt":  # the package's __init__ re-exports only
                visit(target, [*trail, node])
        state[node] = 2

    for node in graph:
        if node != "lowrank_opt":
            visit(node, [])


def test_stacked_reads_evenly_spaced_tensors_in_place_and_copies_the_rest():
    flat = torch.arange(40.0)
    rows = [flat[k * 10 : k * 10 + 6].view(2, 3) for k in range(3)]  # one storage, 10 elements apart
    view = lo.engine.stacked(rows)
    assert view.untyped_storage().data_ptr() == flat.untyped_storage().data_ptr()
    assert torch.equal(view, torch.stack(rows))
    single = lo.engine.stacked(rows[:1])
    assert single.untyped_storage().data_ptr() == flat.untyped_storage().data_ptr() and single.shape == (1, 2, 3)
    unevenly_spaced = [rows[0], rows[1], flat[25:31].view(2, 3)]
    for uneven in ([rows[0], rows[2], rows[1]], unevenly_spaced, [rows[0], torch.ones(2, 3)]):
        copy = lo.engine.stacked(uneven)
        assert copy.untyped_storage().data_ptr() != flat.untyped_storage().data_ptr()
        assert torch.equal(copy, torch.stack(uneven))
    overlapping = [flat[0:6].view(2, 3), flat[3:9].view(2, 3)]
    assert torch.equal(lo.engine.stacked(overlapping), torch.stack(overlapping))
    assert lo.engine.stacked(overlapping).untyped_storage().data_ptr() != flat.untyped_storage().data_ptr()


def test_a_step_reads_the_frozen_factor_in_place_and_lifts_each_gradient_once(monkeypatch):
    """From ``B = 0`` the first step needs the minimum-norm inverse for ``a``: each gradient is still
    lifted once (after the check chose the inverse), and the frozen factor ``a`` is the view's
    basis without a copy while the moving ``b`` is copied (its old value calibrates ``a``'s
    statistics)."""
    pair = make_pair(7, 5, 2, zero_b=True)
    opt = lo.LowRankWrapper(torch.optim.AdamW([pair.a, pair.b], lr=1e-2), [pair])
    lifted: list[str] = []
    groups: list[lo.engine.Group] = []
    lift, step_group = lo.engine._lift_gradients, lo.engine.step_group

    def counting_lift(group, side, config):  # type: ignore[no-untyped-def]
        lifted.append(side)
        return lift(group, side, config)

    def recording_step(group, store, config):  # type: ignore[no-untyped-def]
        groups.append(group)
        return step_group(group, store, config)

    monkeypatch.setattr(lo.engine, "_lift_gradients", counting_lift)
    monkeypatch.setattr(lo.engine, "step_group", recording_step)
    quadratic_loss(torch.ones(7, 5, dtype=torch.float64))(full_weight(pair)).backward()
    opt.step()
    assert sorted(lifted) == ["a", "b"]
    (group,) = groups
    assert group.active == ("b",)  # from B = 0, b moves first
    basis, coeff = group.views["b"].basis, group.views["b"].coeff  # a^T, b^T
    assert basis.untyped_storage().data_ptr() == pair.a.untyped_storage().data_ptr()
    assert coeff.untyped_storage().data_ptr() != pair.b.untyped_storage().data_ptr()
