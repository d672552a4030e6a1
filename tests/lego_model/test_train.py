"""The training objective, EMA, schedule and resumability of lego_model.digits.train."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from lego_model import LegoConfig, LegoModel, get_config, load_checkpoint
from lego_model.digits.train import (
    TrainOptions,
    drop_labels,
    ema_decay_at,
    ema_update,
    joint_loss,
    load_state,
    lr_at,
    main,
    new_state,
    prefix_losses,
    sample_sigma,
    save_state,
    train,
)

# A 1-channel, class-conditional config small enough to train a few steps in milliseconds.
TINY = LegoConfig("tiny_digits_16", (4, 8, 16), (2, 4, 2), (1, 1, 1), 32, 2, img_channels=1, label_dim=10)


def _batch(cfg: LegoConfig, n: int = 6, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(n, cfg.img_channels, 16, 16, generator=g) * 2 - 1
    labels = torch.eye(cfg.label_dim)[torch.randint(cfg.label_dim, (n,), generator=g)] if cfg.label_dim else None
    sigma = sample_sigma(n, -1.2, 1.2, g)
    noise = torch.randn(images.shape, generator=g)
    return images, labels, sigma, noise


def _edm_loss(model, images, labels, sigma, noise, active):
    """The EDM loss of one prefix, through the model's ordinary forward (re-running the prefix)."""
    sd = model.config.sigma_data
    s = sigma.reshape(-1, 1, 1, 1)
    weight = (s**2 + sd**2) / (s * sd) ** 2
    D = model(images + noise * s, sigma, labels, active=active)
    return (weight * (D - images) ** 2).mean()


@pytest.mark.parametrize("name", ["tiny_PG_16", "tiny_PR_16"])
def test_prefix_losses_equal_rerun_prefixes(name):
    model = LegoModel(get_config(name)).randomize_(1)
    cfg = model.config
    images, labels, sigma, noise = _batch(cfg)
    one_pass = prefix_losses(model, images, labels, sigma, noise)
    rerun = torch.stack(
        [_edm_loss(model, images, labels, sigma, noise, tuple(range(k + 1))) for k in range(cfg.num_bricks)]
    )
    # One pass over every prefix vs a rerun per prefix: the same ops, summed over the batch in another grouping
    # (a mean over B <= 16 rows of ~1 losses: a few fp32 ulps, far inside rtol 1e-5).
    torch.testing.assert_close(one_pass, rerun, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(joint_loss(model, images, labels, sigma, noise), rerun.mean(), atol=1e-6, rtol=1e-5)


def test_every_prefix_contributes_to_the_gradient():
    """The joint gradient is the mean of the per-prefix gradients, and differs from the full stack's alone."""
    model = LegoModel(TINY).randomize_(2)
    images, labels, sigma, noise = _batch(TINY)
    params = list(model.parameters())

    def grads(loss):
        return torch.autograd.grad(loss, params, allow_unused=True)

    joint = grads(joint_loss(model, images, labels, sigma, noise))
    per_prefix = [
        grads(_edm_loss(model, images, labels, sigma, noise, tuple(range(k + 1)))) for k in range(TINY.num_bricks)
    ]
    for i, g in enumerate(joint):
        parts = [p[i] if p[i] is not None else torch.zeros_like(params[i]) for p in per_prefix]
        # Gradients through the same graph accumulated in another order (one backward vs one per prefix): fp32
        # reassociation of sums over the batch and tokens, ~sqrt(N) * 2^-24 relative with N <= 4096 terms.
        torch.testing.assert_close(g, torch.stack(parts).mean(0), atol=1e-6, rtol=1e-4)
    # Every brick gets a gradient, and brick 0's differs from what the last prefix alone would give it.
    names = [n for n, _ in model.named_parameters()]
    for k in range(TINY.num_bricks):
        norm = sum(g.abs().sum() for n, g in zip(names, joint) if n.startswith(f"model.model.{k}."))
        assert norm > 0, f"brick {k} got no gradient"
    brick0 = [i for i, n in enumerate(names) if n.startswith("model.model.0.blocks")]
    diff = sum((joint[i] - per_prefix[-1][i]).abs().sum() for i in brick0)
    assert diff > 1e-6


def test_drop_labels():
    labels = torch.eye(10)[torch.arange(1000) % 10]
    g = torch.Generator().manual_seed(0)
    assert torch.equal(drop_labels(labels, 0.0, g), labels)
    assert not drop_labels(labels, 1.0, g).any()
    dropped = drop_labels(labels, 0.25, g)
    null_rows = ~dropped.any(dim=1)
    assert torch.equal(dropped[~null_rows], labels[~null_rows])  # kept rows are untouched
    assert 0.18 < null_rows.float().mean() < 0.32


def test_ema_update_math():
    model, ema = LegoModel(TINY).randomize_(0), LegoModel(TINY).randomize_(1)
    before = [p.clone() for p in ema.parameters()]
    ema_update(ema, model, 0.9)
    for e, b, p in zip(ema.parameters(), before, model.parameters()):
        # torch's lerp vs the written-out formula: two fp32 roundings apart at most (2 * 2^-24 ~ 1.2e-7 relative).
        torch.testing.assert_close(e, 0.9 * b + 0.1 * p, atol=1e-7, rtol=1e-6)
    ema_update(ema, model, 0.0)  # decay 0 copies the weights
    for e, p in zip(ema.parameters(), model.parameters()):
        torch.testing.assert_close(e, p, atol=0, rtol=0)


def test_ema_ramp_and_lr_schedule():
    assert ema_decay_at(0, 0.999) == pytest.approx(0.1)
    assert ema_decay_at(10**6, 0.999) == 0.999
    opts = TrainOptions(steps=100, lr=1e-3, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_at(0, opts) == pytest.approx(1e-4)
    assert lr_at(9, opts) == pytest.approx(1e-3)
    assert lr_at(100, opts) == pytest.approx(1e-4)
    assert all(lr_at(s, opts) >= lr_at(s + 1, opts) for s in range(10, 100))


def _states_equal(a, b):
    for x, y in zip(a.model.state_dict().values(), b.model.state_dict().values()):
        torch.testing.assert_close(x, y, atol=0, rtol=0)
    for x, y in zip(a.ema.state_dict().values(), b.ema.state_dict().values()):
        torch.testing.assert_close(x, y, atol=0, rtol=0)
    assert a.step == b.step
    assert torch.equal(a.generator.get_state(), b.generator.get_state())


def test_resume_continues_identically(tmp_path):
    images, labels, _, _ = _batch(TINY, n=20)
    opts = TrainOptions(steps=6, batch_size=4, warmup_steps=2, seed=5)
    straight = train(
        new_state(TINY, opts),
        images,
        labels,
        out=tmp_path / "a.safetensors",
        state_path=tmp_path / "a.state",
        progress=False,
    )
    first = train(
        new_state(TINY, opts),
        images,
        labels,
        out=tmp_path / "b.safetensors",
        state_path=tmp_path / "b.state",
        progress=False,
        stop_after=3,
    )
    assert first.step == 3
    resumed = load_state(tmp_path / "b.state")
    assert resumed.step == 3 and resumed.opts == opts
    resumed = train(
        resumed, images, labels, out=tmp_path / "b.safetensors", state_path=tmp_path / "b.state", progress=False
    )
    _states_equal(straight, resumed)
    opt_a, opt_b = straight.optimizer.state_dict()["state"], resumed.optimizer.state_dict()["state"]
    assert sorted(opt_a) == sorted(opt_b)
    for idx, slots in opt_a.items():
        for key, value in slots.items():
            torch.testing.assert_close(value, opt_b[idx][key], atol=0, rtol=0)
    # The model file holds the EMA weights and loads as an ordinary checkpoint.
    loaded = load_checkpoint(tmp_path / "b.safetensors")
    for x, y in zip(loaded.state_dict().values(), resumed.ema.state_dict().values()):
        torch.testing.assert_close(x, y, atol=0, rtol=0)


def test_state_roundtrip(tmp_path):
    images, labels, _, _ = _batch(TINY, n=10)
    state = train(
        new_state(TINY, TrainOptions(steps=2, batch_size=2)),
        images,
        labels,
        out=tmp_path / "m.safetensors",
        state_path=tmp_path / "s",
        progress=False,
    )
    save_state(state, tmp_path / "s2")
    _states_equal(state, load_state(tmp_path / "s2"))
    assert not list(tmp_path.glob("*.tmp"))  # atomic writes leave no temporary files


def test_same_seed_same_weights(tmp_path):
    images, labels, _, _ = _batch(TINY, n=10)
    runs = [
        train(
            new_state(TINY, TrainOptions(steps=3, batch_size=2, seed=7)),
            images,
            labels,
            out=tmp_path / f"{i}.safetensors",
            state_path=tmp_path / f"{i}.state",
            progress=False,
        )
        for i in range(2)
    ]
    _states_equal(*runs)


def test_cli_trains_and_resumes_digits(tmp_path):
    pytest.importorskip("sklearn", reason="the digits data need scikit-learn (the data extra)")
    out = tmp_path / "m.safetensors"
    args = ["--out", str(out), "--steps", "2", "--batch-size", "2", "--warmup-steps", "1"]
    runner = CliRunner()
    result = runner.invoke(main, [*args, "--stop-after", "1"])
    assert result.exit_code == 0, result.output
    again = runner.invoke(main, args)  # the state file exists: refuse to start over silently
    assert again.exit_code == 1 and "--resume" in again.output
    wrong = runner.invoke(main, ["--out", str(out), "--resume", "--config", "tiny_PG_16"])
    assert wrong.exit_code == 1 and "leave out --config" in wrong.output
    # Resuming with no options continues the stored run (2 steps of batch 2), not the CLI defaults.
    result = runner.invoke(main, ["--out", str(out), "--resume"])
    assert result.exit_code == 0, result.output
    from safetensors import safe_open

    with safe_open(str(out), framework="pt") as f:
        meta = f.metadata()
    assert meta["train_steps"] == "2" and meta["weights"] == "ema"
    assert json.loads(meta["train_options"])["batch_size"] == 2
    assert load_checkpoint(out).config == get_config("digits_pg_16")


@pytest.mark.parametrize("kind", ["text", "model", "symlink"])
def test_cli_never_replaces_an_existing_out_when_starting(tmp_path, kind):
    out = tmp_path / "m.safetensors"
    if kind == "symlink":
        (tmp_path / "elsewhere.txt").write_text("mine")
        out.symlink_to(tmp_path / "elsewhere.txt")
    else:
        out.write_bytes(b"not a model" if kind == "text" else b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
    before = out.read_bytes()
    result = CliRunner().invoke(main, ["--out", str(out), "--steps", "1"])
    assert result.exit_code == 1 and "exists: choose another --out" in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert out.read_bytes() == before and not (tmp_path / "m.state.safetensors").exists()


def test_cli_resume_without_state_fails_cleanly(tmp_path):
    result = CliRunner().invoke(main, ["--out", str(tmp_path / "m.safetensors"), "--resume"])
    assert result.exit_code == 1
    assert "no training state" in result.output
