"""The train step: equal losses on any mesh, gradient accumulation, freezing, and transformers as reference."""
import jax
import numpy as np
import pytest
import torch

from gpt2_jax import sharding

from gpt2_jax.train import step as train_step
from gpt2_jax.model.config import ModelConfig
from gpt2_jax.train.config import load_train_config

MC = ModelConfig(vocab_size=96, n_positions=32, n_embd=32, n_layer=4, n_head=4, resid_pdrop=0.0, embd_pdrop=0.0,
                 attn_pdrop=0.0)


def batches(n_steps: int, accum: int, batch: int = 16, T: int = 16, seed: int = 0):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n_steps):
        ids = rng.integers(0, MC.vocab_size, (batch, T + 1)).astype(np.int32)
        mask = (rng.random((batch, T)) > 0.25).astype(np.float32)
        shape = (accum, batch // accum, T)
        # One example a row (segment 1, positions from 0): with data.packing on, the step's segment mask
        # must then reduce to plain causal attention.
        out.append({"input_ids": ids[:, :-1].reshape(shape), "labels": ids[:, 1:].reshape(shape),
                    "loss_mask": mask.reshape(shape), "segment_ids": np.ones(shape, np.int32),
                    "positions": np.broadcast_to(np.arange(T, dtype=np.int32), shape).copy()})
    return out


def run(overrides=(), data=1, fsdp=1, n_devices=1, accum=1, steps=3, params=None, mc=MC, data_batches=None):
    cfg = load_train_config(None, ["optim.warmup_steps=0", "optim.lr=1e-2", f"optim.grad_accum={accum}",
                                   f"train.steps={steps}", *overrides])
    mesh = sharding.make_mesh(data, fsdp, jax.devices()[:n_devices])
    setup = train_step.build_setup(mc, cfg, mesh)
    state = train_step.init_state(setup, params=params)
    start = host_params(state)
    step, _ = train_step.compile_steps(setup)
    losses = []
    for b in data_batches or batches(steps, accum):
        state, m = step(state, sharding.global_batch(b, mesh))
        losses.append(float(m["loss"]))
    return np.array(losses), start, host_params(state), state


def host_params(state) -> dict:
    return sharding.host_values({**state.params, **state.frozen})


def assert_close_params(a: dict, b: dict):
    # Elementwise comparison is too strict after Adam, which turns float-rounding noise in a ~0 gradient
    # into a full-size step (the key bias has an exactly-zero gradient); tensors agree to 1e-3 of their norm.
    for k in a:
        assert np.linalg.norm(a[k] - b[k]) <= 1e-3 * np.linalg.norm(b[k]), k


@pytest.fixture(scope="module")
def single():
    return run()


@pytest.mark.slow
@pytest.mark.parametrize("data, fsdp", [(2, 4), (8, 1), (1, 8)])
def test_same_losses_on_8_devices(single, data, fsdp):
    losses, _, end, state = run(data=data, fsdp=fsdp, n_devices=8)
    np.testing.assert_allclose(losses, single[0], rtol=1e-5)
    assert_close_params(end, single[2])
    if fsdp > 1:  # parameters and Adam moments really are split over fsdp
        kernel = state.params["transformer/h/0/mlp/c_fc/kernel"]
        assert kernel.sharding.spec == jax.sharding.PartitionSpec("fsdp", None)
        assert kernel.addressable_shards[0].data.shape == (MC.n_embd // fsdp, 4 * MC.n_embd)


@pytest.mark.slow
@pytest.mark.parametrize("remat", ["block", "dots_with_no_batch_dims_saveable", "nothing_saveable"])
def test_remat_changes_nothing_but_memory(single, remat):
    losses, _, end, _ = run([f"model.remat={remat}"])
    np.testing.assert_allclose(losses, single[0], rtol=1e-6)
    assert_close_params(end, single[2])


@pytest.mark.slow
@pytest.mark.parametrize("data, fsdp", [(1, 1), (2, 4)])
def test_chunked_loss_trains_the_same(single, data, fsdp):
    losses, _, end, _ = run(["model.loss_chunk=5"], data=data, fsdp=fsdp, n_devices=data * fsdp)
    np.testing.assert_allclose(losses, single[0], rtol=1e-5)
    assert_close_params(end, single[2])


@pytest.mark.slow
def test_unpacked_batches_train_the_same(single):
    losses, _, end, _ = run(["data.packing=false"])
    np.testing.assert_allclose(losses, single[0], rtol=1e-6)
    assert_close_params(end, single[2])


@pytest.mark.slow
def test_gradient_accumulation_is_one_big_batch(single):
    losses, _, end, _ = run(accum=4)
    np.testing.assert_allclose(losses, single[0], rtol=1e-5)
    assert_close_params(end, single[2])


@pytest.mark.slow
@pytest.mark.parametrize("overrides, trainable", [
    (["freeze.trainable=head"], {"transformer/wte/embedding"}),
    (["freeze.trainable=last_n_blocks", "freeze.last_n_blocks=2"], None),
])
def test_frozen_parameters_are_bit_identical_and_have_no_optimizer_state(overrides, trainable):
    _, start, end, state = run(overrides)
    trainable = trainable or {k for k in start if k.startswith(("transformer/h/2/", "transformer/h/3/",
                                                                 "transformer/ln_f/"))}
    assert set(state.params) == trainable
    for k in start:
        if k in trainable:
            assert not np.array_equal(start[k], end[k]), f"{k} should have trained"
        else:
            assert np.array_equal(start[k], end[k]), f"{k} is frozen but changed"
    # Adam's two moments for exactly the trainable parameters, plus step counters.
    moments = 2 * sum(end[k].nbytes for k in trainable)
    assert moments <= train_step.optimizer_state_bytes(state) <= moments + 64


def test_loss_and_adamw_step_equal_transformers_and_torch(hf_dir):
    """Our loss equals GPT2LMHeadModel's on the same weights, and one AdamW step (decay on matrices only,
    clipping) lands on torch.optim.AdamW's parameters."""
    from gpt2_jax.checkpoints.hf import params_from_state_dict, read_hf_state_dict, load_hf_config

    path, tmodel = hf_dir(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    mc = load_hf_config(path)
    fmt, sd = read_hf_state_dict(path)
    params = params_from_state_dict(mc, sd, fmt)
    b = batches(1, 1, batch=4, T=12)[0]
    b["input_ids"] %= mc.vocab_size
    b["labels"] %= mc.vocab_size
    # eps=1e-3: with 1e-8, Adam scales float noise in a ~0 gradient (the key bias's is exactly 0) to a
    # full-size step, and the two implementations' noise differs.
    lr, wd, clip = 1e-2, 0.1, 0.5
    losses, _, end, _ = run([f"optim.lr={lr}", f"optim.weight_decay={wd}", f"optim.clip={clip}",
                             "optim.schedule=constant", "optim.eps=1e-3"], steps=1, params=params, mc=mc, data_batches=[b])

    # The same sequences through transformers, which shifts the labels itself; masked labels are -100.
    ids = np.concatenate([b["input_ids"][0], b["labels"][0][:, -1:]], axis=1).astype(np.int64)
    labels = np.concatenate([np.full_like(ids[:, :1], -100),
                             np.where(b["loss_mask"][0] > 0, b["labels"][0], -100)], axis=1)
    tmodel.train()
    ref_loss = tmodel(torch.as_tensor(ids), labels=torch.as_tensor(labels)).loss
    np.testing.assert_allclose(losses[0], ref_loss.item(), rtol=1e-6)

    named = dict(tmodel.named_parameters())
    decay = [p for n, p in named.items() if p.ndim >= 2]
    no_decay = [p for n, p in named.items() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": wd}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.95), eps=1e-3)
    opt.zero_grad()
    ref_loss.backward()
    torch.nn.utils.clip_grad_norm_(tmodel.parameters(), clip)
    opt.step()
    from gpt2_jax.checkpoints.hf import torch_name

    for k, v in end.items():
        want = named[torch_name(k)].detach().numpy()
        np.testing.assert_allclose(v, want, rtol=1e-4, atol=2e-6, err_msg=k)


@pytest.mark.slow
def test_gradients_equal_torch(hf_dir):
    """Every parameter's gradient of the mean token loss equals PyTorch autograd's through GPT2LMHeadModel
    (LayerNorm has a hand-written backward; the tied head sums both uses)."""

    from gpt2_jax.checkpoints.hf import load_hf_config, params_from_state_dict, read_hf_state_dict, torch_name

    path, tmodel = hf_dir(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    mc = load_hf_config(path)
    fmt, sd = read_hf_state_dict(path)
    params = {k: np.asarray(v) for k, v in params_from_state_dict(mc, sd, fmt).items()}
    b = {k: v[0] for k, v in batches(1, 1, batch=4, T=12)[0].items()}
    b["input_ids"] %= mc.vocab_size
    b["labels"] %= mc.vocab_size
    setup = train_step.build_setup(mc, load_train_config(None, []), sharding.make_mesh(1, 1, jax.devices()[:1]))
    state = train_step.init_state(setup, params=params)

    def mean_loss(p):
        total, (count, _) = train_step.loss_sums(setup.layout, p, {}, state.rng, b, train=True)
        return total / count

    grads = jax.grad(mean_loss)(state.params)
    ids = np.concatenate([b["input_ids"], b["labels"][:, -1:]], axis=1).astype(np.int64)
    labels = np.concatenate([np.full_like(ids[:, :1], -100), np.where(b["loss_mask"] > 0, b["labels"], -100)], axis=1)
    tmodel.train()
    tmodel.zero_grad()
    tmodel(torch.as_tensor(ids), labels=torch.as_tensor(labels)).loss.backward()
    named = dict(tmodel.named_parameters())
    assert len(grads) == len(named)
    for k, g in grads.items():
        want = named[torch_name(k)].grad.numpy()
        scale = np.abs(want).max()
        assert scale > 0, k
        np.testing.assert_allclose(np.asarray(g), want, atol=1e-5 * scale, rtol=0, err_msg=k)
