"""Sweep budgets in tokens: each trial's steps and validation cadence follow from its batch size (no Ray needed)."""

import pytest

from raylm.config import ConfigError, load_config
from raylm.data.shards import Manifest
from raylm.tune.sweep import Budget, build_scheduler, sweep_budget, trial_config

MANIFEST = Manifest.of({"seq_len": 32, "splits": {"train": {"blocks": 1000}}})


def test_trials_are_budgeted_in_tokens_not_steps():
    cfg = load_config(None, ["tune.budget_tokens=10000", "tune.scheduler={asha: {grace_tokens: 1000}}"])
    budget = sweep_budget(cfg, MANIFEST)
    assert budget == Budget(tokens=10000, eval_tokens=1000, grace_tokens=1000, seq_len=32)
    base = cfg.model_dump(mode="json")
    small = trial_config(base, {"train.batch_size": 4, "train.lr": 1e-3}, budget).train
    large = trial_config(base, {"train.batch_size": 16, "train.lr": 1e-3}, budget).train
    # ceil(10000 / (4 x 32)) = 79 steps and ceil(10000 / (16 x 32)) = 20: the same tokens, 4x the steps.
    assert (small.max_steps, small.eval_every, small.lr) == (79, 8, 1e-3)
    assert (large.max_steps, large.eval_every) == (20, 2)
    assert small.epochs is None


def test_default_budget_is_what_the_train_section_trains_on():
    cfg = load_config(None, ["train.max_steps=50", "train.batch_size=8"])
    budget = sweep_budget(cfg, MANIFEST)
    assert budget.tokens == 50 * 8 * 32
    assert budget.grace_tokens == int(budget.tokens / 9)  # default ASHA: reduction factor 3, three rungs
    epochs = load_config(None, ["train.max_steps=null", "train.epochs=2", "train.batch_size=8"])
    assert sweep_budget(epochs, MANIFEST).tokens == 2 * 1000 * 32  # 250 steps of 8 blocks of 32 tokens
    grid = load_config(None, ["tune.scheduler=grid", "tune.budget_tokens=5000"])
    assert sweep_budget(grid, MANIFEST) == Budget(tokens=5000, eval_tokens=500, grace_tokens=None, seq_len=32)


def test_asha_counts_tokens_seen():
    cfg = load_config(None, ["tune.budget_tokens=9000", "tune.scheduler={asha: {grace_tokens: 1000}}"])
    scheduler = build_scheduler(cfg, sweep_budget(cfg, MANIFEST))
    assert scheduler._time_attr == "tokens_seen" and scheduler._max_t == 9000
    assert [rung for rung, _ in scheduler._brackets[0]._rungs] == [9000, 3000, 1000]
    assert type(build_scheduler(load_config(None, ["tune.scheduler=grid"]), Budget(1, 1, None, 1))).__name__ == (
        "FIFOScheduler"
    )


def test_a_grace_beyond_the_default_budget_is_refused():
    cfg = load_config(None, ["train.max_steps=10", "tune.scheduler={asha: {grace_tokens: 999999}}"])
    with pytest.raises(ConfigError, match=r"grace_tokens=999999 is more than the budget of 2560 tokens"):
        sweep_budget(cfg, MANIFEST)
    # A budget given in the config is checked with the config, by the same rule.
    with pytest.raises(ConfigError, match=r"grace_tokens=5000 is more than the budget of 1000 tokens"):
        load_config(None, ["tune.budget_tokens=1000", "tune.scheduler={asha: {grace_tokens: 5000}}"])


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("tune.scheduler=hyperband", "unknown scheduler 'hyperband': use asha or grid"),
        ("tune.scheduler={asha: {}, grid: {}}", "give exactly one of asha: {...} or grid: {}"),
        ('tune.space={"train.max_steps": {"choice": [5]}}', "'train.max_steps' cannot be swept"),
        ('tune.space={"train.lr": {"choice": [-1.0]}}', "tune.space.train.lr: -1.0 is invalid"),
        ("tune.scheduler={asha: {reduction_factor: 1}}", "reduction_factor: Input should be greater than 1"),
    ],
)
def test_invalid_sweeps_name_the_parameter(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override, "tune.budget_tokens=1000"])
    assert message in str(err.value)


def test_swept_values_keep_their_field_type():
    # YAML 1.1 reads 3e-3 (no dot) as a string: the sweep must try (and report) the number.
    cfg = load_config(None, ['tune.space={"train.lr": {"grid": [3e-3, 1e-2]}, "train.batch_size": {"choice": ["8"]}}'])
    assert cfg.tune.space["train.lr"]["grid"] == [0.003, 0.01]
    assert cfg.tune.space["train.batch_size"]["choice"] == [8]


def test_the_results_table_shows_error_text_as_written(capsys):
    """A trial's error is printed as text: rich would read "[/data/x.bin]" as a closing tag and raise."""
    from raylm.tune.results import show_results

    row = {"trial_id": "t1", "train.lr": 1e-3, "steps": 4, "tokens_seen": 128, "val_loss": None, "val_ppl": None}
    rows = [
        {**row, "status": "error", "error": "OSError: cannot read [/data/x.bin] [bold]"},
        {**row, "trial_id": "t2", "val_loss": 2.0, "val_ppl": 7.39, "status": "done", "error": None},
    ]
    show_results(rows, {"best_config": {"train.lr": 1e-3}, "best_trial": "t2"})
    assert "[/data/x.bin] [bold]" in capsys.readouterr().err  # raylm's console is stderr
