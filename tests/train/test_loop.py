"""Whole training runs on data/sample.csv with a tiny model: resume, preemption, faults, export, errors."""
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
import torch
import transformers

from gpt2_jax.data import batches
from gpt2_jax.checkpoints.orbax import Checkpointer
from gpt2_jax.data.rows import read_rows
from gpt2_jax.data.token_writer import tokenize_corpus
from gpt2_jax.train.config import load_train_config
from gpt2_jax.errors import GPT2JaxError
from gpt2_jax.train.loop import train

ROOT = Path(__file__).resolve().parents[2]
SAMPLE = ROOT / "data" / "sample.csv"
SHARED = {}  # the one SentencePiece tokenizer the runs share (tests/test_demo.py trains one in a run)


@pytest.fixture(scope="module", autouse=True)
def shared_tokenizer(tmp_path_factory):
    from gpt2_jax.data.rows import row_texts
    from gpt2_jax.tokenizer import train_sentencepiece

    SHARED["tokenizer"] = tmp_path_factory.mktemp("shared") / "tokenizer"
    train_sentencepiece(row_texts(read_rows(SAMPLE)), SHARED["tokenizer"], 400)


def overrides(tmp: Path, **extra) -> list[str]:
    base = {"tokenizer.path": str(SHARED["tokenizer"]), "data.train": str(SAMPLE), "data.cache_dir": str(tmp / "cache"), "data.max_length": 48,
            "data.val_fraction": 0.1, "model.n_layer": 2, "model.n_embd": 32, "model.n_head": 4,
            "model.n_positions": 64, "model.dropout": 0.1, "tokenizer.sentencepiece_vocab_size": 400,
            "train.batch_size": 16, "train.steps": 6, "train.log_every": 1, "train.eval_every": 3,
            "train.eval_batches": 2, "train.out_dir": str(tmp / "run"), "checkpoint.every": 3,
            "optim.grad_accum": 2, "optim.warmup_steps": 2, "optim.lr": 3e-3, "sample.num": 0,
            "sample.metric_rows": 0}
    base.update({k.replace("__", "."): v for k, v in extra.items()})
    return [f"{k}={v}" for k, v in base.items()]


def run(tmp: Path, **extra) -> dict:
    return train(load_train_config(None, overrides(tmp, **extra)))


def cli(tmp: Path, *args, devices: int = 8, env_extra=None, **extra) -> subprocess.Popen:
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}", **(env_extra or {})}
    return subprocess.Popen([sys.executable, str(ROOT / "train.py"), *overrides(tmp, **extra), *args], cwd=ROOT,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def log_lines(caplog, level: int = logging.INFO, logger: str = "gpt2_jax") -> list[str]:
    """The messages caplog holds from `level` up, of `logger` and its children ("": every logger)."""
    return [r.getMessage() for r in caplog.records if r.levelno >= level and r.name.startswith(logger)]


def latest_state(run_dir: Path) -> dict:
    ckpt = Checkpointer(str(run_dir), read_only=True)
    step = ckpt.latest_step()
    state = ckpt.manager.restore(step)["state"]
    ckpt.close()
    return {"step": step, **{jax.tree_util.keystr(p): np.asarray(v) for p, v in
                             jax.tree_util.tree_leaves_with_path(state)}}


@pytest.mark.slow
def test_demo_shaped_run_learns_and_exports(tmp_path):
    # 200 steps: long rows continue in windows whose repeated prompt is context only, so a step holds about
    # half the labels it held when rows were cut at the window (and harder ones: text, not titles).
    out = run(tmp_path, train__steps=200, train__eval_every=100, train__log_every=1, sample__num=2,
              sample__max_new_tokens=8, checkpoint__every=100, sample__metric_rows=4)
    run_dir = tmp_path / "run"
    # The validation loss beats predicting every token from its training frequency alone.
    assert out["val_loss"] < out["unigram_loss"] < np.log(400)
    assert len(out["samples"]) == 2
    lines = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [l["step"] for l in lines if l["split"] == "train"] == list(range(1, 201))
    assert {l["step"] for l in lines if l["split"] == "val"} == {100, 200}
    # Keyword metrics of held-out samples at the evaluation and at the end.
    sample = {l["step"]: l for l in lines if l["split"] == "sample"}
    assert set(sample) == {100, 200}
    for m in sample.values():
        assert 0 <= m["keyword_coverage"] <= 1 and 0 <= m["swapped_coverage"] <= 1 and 0 < m["distinct_2"] <= 1
    assert out["sample_metrics"] == {k: v for k, v in sample[200].items() if k not in ("step", "split", "time")}
    assert list((run_dir / "tb").glob("events.out.tfevents.*"))
    # The final export equals the checkpoint, and transformers reads it with the same logits.
    from gpt2_jax import load_pretrained

    ours = load_pretrained(str(run_dir))
    hf = transformers.GPT2LMHeadModel.from_pretrained(run_dir / "hf").eval()
    ids = np.array([[1, 5, 7, 9, 11, 13]])
    with torch.no_grad():
        ref = hf(torch.as_tensor(ids)).logits.numpy()
    np.testing.assert_allclose(np.asarray(ours(ids)), ref, atol=1e-5)
    from gpt2_jax import load_tokenizer

    tok = load_tokenizer(str(run_dir))
    cfg = json.loads((run_dir / "hf" / "config.json").read_text())
    assert (cfg["bos_token_id"], cfg["eos_token_id"], cfg["pad_token_id"]) == (tok.bos_id, tok.eos_id, tok.pad_id)


@pytest.mark.slow
@pytest.mark.parametrize("mesh", [{}, {"mesh__data": 2, "mesh__fsdp": 4}], ids=["data8", "data2-fsdp4"])
def test_resume_is_bitwise_equal_to_one_run(tmp_path, mesh):
    """6 steps in one run == 3 steps, a fresh start restoring, 3 more: with dropout, keyword augmentation and
    gradient accumulation, parameters and optimiser state are bitwise equal."""
    run(tmp_path / "a", **mesh)
    run(tmp_path / "b", train__steps=3, **mesh)
    resumed = run(tmp_path / "b", **mesh)
    a, b = latest_state(tmp_path / "a" / "run"), latest_state(tmp_path / "b" / "run")
    assert a["step"] == b["step"] == 6 and resumed["steps"] == 6
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


@pytest.mark.slow
def test_resume_refuses_a_breaking_change_and_allows_a_harmless_one(tmp_path):
    run(tmp_path, train__steps=3)
    with pytest.raises(GPT2JaxError, match=r"cannot resume .*model.n_embd: 32 -> 64"):
        run(tmp_path, model__n_embd=64, model__n_head=4)
    out = run(tmp_path, train__steps=4, train__log_every=2)  # more steps, other logging: fine
    assert out["steps"] == 4
    with pytest.raises(GPT2JaxError, match=r"train.steps=2 is below step 4 of the checkpoint in .*: nothing to "
                                           r"train; raise train.steps"):
        run(tmp_path, train__steps=2)
    fresh = run(tmp_path, train__steps=2, checkpoint__resume="false")
    assert fresh["steps"] == 2 and Checkpointer(str(tmp_path / "run"), read_only=True).latest_step() == 2


@pytest.mark.slow
def test_resume_accepts_the_changes_it_declares_harmless(tmp_path, caplog):
    """model.dropout and model.dtype may change on resume (the model's dropout rates and compute dtype, saved
    with each checkpoint, change with them); the model's shape may not, and the refusal names the key."""
    caplog.set_level(logging.INFO, logger="gpt2_jax")
    run(tmp_path, train__steps=3)  # model.dropout=0.1
    caplog.clear()
    assert run(tmp_path, train__steps=4, model__dropout=0.0)["steps"] == 4
    assert f"resumed from step 3 of {tmp_path / 'run'} (changed: model.dropout: 0.1 -> 0.0; train.steps: 3 -> 4)" \
        in log_lines(caplog)
    assert run(tmp_path, train__steps=5, model__dropout=0.0, model__dtype="bfloat16")["steps"] == 5
    with pytest.raises(GPT2JaxError, match=r"cannot resume .*model\.n_layer: 2 -> 3"):
        run(tmp_path, train__steps=6, model__n_layer=3)


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    original = batches.Batches.local_batch

    def poisoned(self, step):
        batch = original(self, step)
        if step == 4 and self.num_examples > 20:  # training batches only
            batch["loss_mask"] = batch["loss_mask"] * np.float32("nan")
        return batch

    monkeypatch.setattr(batches.Batches, "local_batch", poisoned)
    with pytest.raises(GPT2JaxError, match="training loss is nan .* at step 5: stopped; the latest good "
                                           "checkpoint is step 4"):
        run(tmp_path, checkpoint__every=1)
    assert Checkpointer(str(tmp_path / "run"), read_only=True).latest_step() == 4


def _wait_for_records(metrics, n: int, *, poll: float, timeout: float = 120):
    """`metrics` (a run's metrics.jsonl) once it holds `n` records, or after `timeout` seconds."""
    deadline = time.time() + timeout
    while time.time() < deadline and not (metrics.exists() and len(metrics.read_text().splitlines()) >= n):
        time.sleep(poll)
    return metrics


@pytest.mark.slow
def test_sigterm_saves_the_current_step_and_resume_continues(tmp_path):
    proc = cli(tmp_path, train__steps=10_000, checkpoint__every=0)
    metrics = _wait_for_records(tmp_path / "run" / "metrics.jsonl", 3, poll=0.2)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr
    saved = Checkpointer(str(tmp_path / "run"), read_only=True).latest_step()
    assert saved is not None and saved >= 3 and f"SIGTERM: saved a checkpoint at step {saved}" in stderr
    out = run(tmp_path, train__steps=saved + 2, checkpoint__every=0)
    assert out["steps"] == saved + 2


@pytest.mark.slow
def test_checkpoint_crosses_topologies(tmp_path):
    """Written with fsdp=8 on 8 devices, continued on 1 device: the same losses as one run on 8 devices."""
    reference = run(tmp_path / "ref", mesh__data=1, mesh__fsdp=8, checkpoint__every=0)
    run(tmp_path / "x", mesh__data=1, mesh__fsdp=8, train__steps=3)
    proc = cli(tmp_path / "x", devices=1, mesh__data=1, mesh__fsdp=1)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr
    losses = lambda d: {l["step"]: l["loss"] for l in map(json.loads, (d / "run" / "metrics.jsonl").read_text().splitlines())
                        if l["split"] == "train"}
    ref, got = losses(tmp_path / "ref"), losses(tmp_path / "x")
    assert sorted(got) == sorted(ref) == list(range(1, 7))
    for step in ref:
        assert abs(got[step] - ref[step]) <= 1e-5 * abs(ref[step]), (step, got[step], ref[step])
    assert reference["steps"] == 6


@pytest.mark.slow
def test_one_device_resume_is_bitwise_and_continues_on_fsdp8(tmp_path):
    """On 1 device: 6 steps == 3 + resume + 3, bitwise. The 1-device checkpoint of step 3 also continues
    with fsdp=8 on 8 devices with the same losses (the reverse of the test above)."""
    import shutil

    one = dict(devices=1, mesh__data=1, mesh__fsdp=1)

    def cli_run(tmp, **extra):
        _, stderr = (proc := cli(tmp, **one, **extra)).communicate(timeout=300)
        assert proc.returncode == 0, stderr[-3000:]

    cli_run(tmp_path / "a")
    cli_run(tmp_path / "b", train__steps=3)
    shutil.copytree(tmp_path / "b", tmp_path / "c")
    cli_run(tmp_path / "b")
    a, b = latest_state(tmp_path / "a" / "run"), latest_state(tmp_path / "b" / "run")
    assert a["step"] == b["step"] == 6 and a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    run(tmp_path / "c", mesh__data=1, mesh__fsdp=8)
    ref, got = train_losses(tmp_path / "a" / "run"), train_losses(tmp_path / "c" / "run")
    assert sorted(got) == sorted(ref) == list(range(1, 7))
    for step in ref:
        assert abs(got[step] - ref[step]) <= 1e-5 * abs(ref[step]), (step, got[step], ref[step])


@pytest.mark.parametrize("extra, message", [
    ({"train__batch_size": 12, "optim__grad_accum": 1}, "12 sequences per micro-batch is not divisible by the "
                                                        "data-parallel size 8"),
    ({"model__init_from": "/nonexistent/gpt2"}, "model.init_from: model path does not exist: /nonexistent/gpt2"),
    ({"data__train": "/nonexistent.csv"}, "corpus file /nonexistent.csv does not exist"),
    ({"freeze__trainable": "last_n_blocks", "freeze__last_n_blocks": 5}, "freeze.last_n_blocks=5 must be between 1"),
])
def test_bad_runs_fail_with_a_clear_message(tmp_path, extra, message):
    with pytest.raises(GPT2JaxError, match=message.replace(".", r"\.").replace("(", r"\(")):
        run(tmp_path, **extra)


@pytest.mark.slow
def test_malformed_rows_and_empty_corpus(tmp_path):
    bad = tmp_path / "bad.csv"
    rows = SAMPLE.read_text().splitlines(keepends=True)
    bad.write_text("".join(rows[:40]) + "only,two\n" + "".join(rows[40:]))
    with pytest.raises(GPT2JaxError, match=r"bad.csv:41: expected 3 CSV columns"):
        run(tmp_path, data__train=bad)
    out = run(tmp_path, data__train=bad, data__skip_bad_rows="true", train__steps=1, checkpoint__every=0)
    assert out["steps"] == 1
    empty = tmp_path / "empty.csv"
    empty.write_text("title,keywords,text\n")
    with pytest.raises(GPT2JaxError, match="empty corpus"):
        run(tmp_path / "e", data__train=empty)


def test_out_dir_that_is_a_file_is_one_line(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(GPT2JaxError, match=r"train.out_dir .*file is a file, not a directory"):
        run(tmp_path, train__out_dir=tmp_path / "file")


def test_cli_error_is_one_line(tmp_path):
    proc = cli(tmp_path, "optim.lrr=1")
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 2
    assert stderr.strip() == 'error: unknown config key optim.lrr (did you mean "optim.lr"?)'


@pytest.fixture(scope="module")
def gpt2_like_dir(tmp_path_factory):
    """A tiny Hugging Face GPT-2 directory whose byte-level BPE has no [BOS] [SEP] [EOS] [PAD], like `gpt2`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2TokenizerFast

    from conftest import make_hf_model

    rows = read_rows(SAMPLE)
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator([r.title + " " + r.text for r in rows], trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|endoftext|>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = GPT2TokenizerFast(tokenizer_object=bpe, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                            unk_token="<|endoftext|>")
    path = tmp_path_factory.mktemp("gpt2-like")
    model = make_hf_model(vocab_size=len(tok), n_positions=64, attn_gain=1.0)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path, model


@pytest.mark.slow
@pytest.mark.parametrize("freeze, trainable_prefixes", [
    (["freeze.trainable=head"], ("transformer/wte/",)),
    (["freeze.trainable=last_n_blocks", "freeze.last_n_blocks=1"], ("transformer/h/2/", "transformer/ln_f/")),
])
def test_fine_tune_from_hugging_face_with_frozen_parameters(tmp_path, gpt2_like_dir, freeze, trainable_prefixes):
    from gpt2_jax.checkpoints.hf import torch_name

    path, hf_model = gpt2_like_dir
    cfg = load_train_config(None, overrides(tmp_path, model__init_from=path, model__n_layer="null",
                                            model__n_embd="null", model__n_head="null", model__n_positions="null",
                                            checkpoint__every=0, tokenizer__path="null") + freeze)
    out = train(cfg)
    ckpt = Checkpointer(str(tmp_path / "run"), read_only=True)
    trained = ckpt.restore_params(out["steps"])
    ckpt.close()
    original = {n: p.detach().numpy() for n, p in hf_model.named_parameters()}
    vocab = original["transformer.wte.weight"].shape[0]
    for key, value in trained.items():
        ref = original[torch_name(key)]
        if key == "transformer/wte/embedding":
            assert value.shape == (vocab + 4, ref.shape[1])  # [BOS] [SEP] [EOS] [PAD] added
            value = value[:vocab]
        if key.startswith(trainable_prefixes):
            assert not np.array_equal(value, ref), f"{key} should have trained"
        else:
            assert np.array_equal(value, ref), f"{key} is frozen but changed"


def test_init_from_with_a_tokenizer_of_another_vocabulary_is_refused(tmp_path, gpt2_like_dir):
    from conftest import make_hf_model

    path, _ = gpt2_like_dir
    other = tmp_path / "other"
    make_hf_model(vocab_size=97, n_positions=64).save_pretrained(other)
    with pytest.raises(GPT2JaxError, match=r"model.init_from .*other has a vocabulary of 97 tokens but the tokenizer "
                                           r"has \d+ \(\+4 added\)"):
        run(tmp_path, model__init_from=other, tokenizer__path=path, model__n_layer="null", model__n_embd="null",
            model__n_head="null", model__n_positions="null")


@pytest.mark.parametrize("loss_on", ["text", "all"])
def test_loss_on_text_gives_no_gradient_from_title_and_keywords(tmp_path, loss_on):
    import jax.numpy as jnp

    from gpt2_jax.tokenizer import train_sentencepiece
    from gpt2_jax.train.step import masked_cross_entropy

    rows = read_rows(SAMPLE)[:8]
    tok = train_sentencepiece([s for r in read_rows(SAMPLE) for s in (r.title, " ".join(r.keywords), r.text)],
                              tmp_path / "tok", 400)
    corpus = tokenize_corpus(rows, tok, tmp_path / "cache")
    eight = batches.Batches(corpus, np.arange(8), bos_id=tok.bos_id, sep_id=tok.sep_id, eos_id=tok.eos_id,
                            pad_id=tok.pad_id, max_length=64, batch_size=8, shuffle=False, keyword_augment=False,
                            loss_on=loss_on)
    b = {k: v[0] for k, v in eight.local_batch(0).items()}
    logits = jax.random.normal(jax.random.key(0), (*b["input_ids"].shape, len(tok)))
    grad = jax.grad(lambda l: masked_cross_entropy(l, jnp.asarray(b["labels"]), jnp.asarray(b["loss_mask"]))[0])(logits)
    per_position = np.abs(np.asarray(grad)).sum(-1)
    windows = eight.row_windows(0)[0]
    for r, ids in enumerate(b["input_ids"]):
        second_sep = np.flatnonzero(ids == tok.sep_id)[1]
        real = np.flatnonzero(ids != tok.pad_id)
        # Positions before the second [SEP] predict title / keyword / [SEP] tokens; from it on, the text.
        context, text = real[real < second_sep], real[real >= second_sep]
        if windows[r][0][2] > 0:  # a continuation window: its repeated prompt is context under either setting
            assert np.all(per_position[r, context] == 0) and per_position[r, second_sep] == 0
            assert np.all(per_position[r, text[1:]] > 0)
            continue
        assert np.all(per_position[r, text] > 0)
        assert np.all(per_position[r, context] == 0) if loss_on == "text" else np.all(per_position[r, context] > 0)
        assert np.all(per_position[r, ids.size:] == 0)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_losses(run_dir: Path) -> dict:
    return {l["step"]: l["loss"] for l in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
            if l["split"] == "train"}


@pytest.mark.slow
def test_two_processes_train_like_one_with_eight_devices(tmp_path):
    """jax.distributed over localhost, 4 CPU devices per process: the losses of one 8-device process."""
    run(tmp_path / "one", mesh__data=2, mesh__fsdp=4, checkpoint__every=0)
    port = free_port()
    procs = [cli(tmp_path / "two", devices=4, mesh__data=2, mesh__fsdp=4, checkpoint__every=0,
                 mesh__num_processes=2, mesh__process_id=i, mesh__coordinator_address=f"127.0.0.1:{port}",
                 env_extra={"JAX_CPU_COLLECTIVES_IMPLEMENTATION": "gloo"}) for i in range(2)]
    for p in procs:
        _, stderr = p.communicate(timeout=300)
        assert p.returncode == 0, stderr[-3000:]
    one, two = train_losses(tmp_path / "one" / "run"), train_losses(tmp_path / "two" / "run")
    assert sorted(two) == sorted(one) == list(range(1, 7))
    for step in one:
        assert abs(two[step] - one[step]) <= 1e-5 * abs(one[step]), (step, two[step], one[step])
    assert [p.name for p in (tmp_path / "two" / "run" / "checkpoints").iterdir() if p.name.isdigit()] == ["6"]


@pytest.mark.slow
def test_kill_9_at_random_moments_then_resume_ends_like_an_uninterrupted_run(tmp_path):
    steps = dict(train__steps=12, checkpoint__every=2, checkpoint__keep=2)
    run(tmp_path / "ref", **steps)
    rng = np.random.default_rng(0)
    metrics = tmp_path / "x" / "run" / "metrics.jsonl"
    logged = lambda: len(metrics.read_text().splitlines()) if metrics.exists() else 0  # noqa: E731
    kills = 0
    for attempt in range(10):
        before = logged()
        proc = cli(tmp_path / "x", **steps)
        if kills < 3:
            # Kill after a random number of newly logged steps plus a random delay, so the moment falls
            # anywhere in training or a checkpoint save, however fast the machine (a fixed wall-clock delay
            # lets a warm-cache run finish first).
            target, deadline = rng.integers(1, 6), time.time() + 300
            while proc.poll() is None and logged() - before < target and time.time() < deadline:
                time.sleep(0.02)
            time.sleep(rng.uniform(0.0, 0.2))
            if proc.poll() is None:
                proc.kill()  # SIGKILL: no handler runs, a save may be half written
                kills += 1
                proc.communicate()
                continue
        _, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 0, stderr[-3000:]
        break
    assert kills >= 1
    a, b = latest_state(tmp_path / "ref" / "run"), latest_state(tmp_path / "x" / "run")
    assert a["step"] == b["step"] == 12
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


@pytest.mark.slow
def test_export_from_a_run_directory_loads_in_transformers(tmp_path):
    """tools/export_hf.py on an fsdp-sharded checkpoint: Flax and PyTorch GPT-2 give our logits; special tokens
    and generation defaults set."""
    run(tmp_path, train__steps=3, checkpoint__every=0, mesh__data=1, mesh__fsdp=8)
    out = tmp_path / "export"
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "export_hf.py"), "--checkpoint", str(tmp_path / "run"),
                           "--out", str(out)], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    from gpt2_jax import load_pretrained, load_tokenizer

    ours = load_pretrained(str(tmp_path / "run"))
    tok = load_tokenizer(str(out))
    ids = np.array([tok.format_prompt("A title", "some keywords") + [7, 8, 9]])
    want = np.asarray(ours(ids))
    pt = transformers.GPT2LMHeadModel.from_pretrained(out).eval()
    with torch.no_grad():
        np.testing.assert_allclose(pt(torch.as_tensor(ids)).logits.numpy(), want, atol=1e-5)
    fx = transformers.FlaxGPT2LMHeadModel.from_pretrained(out)
    np.testing.assert_allclose(np.asarray(fx(ids).logits), want, atol=1e-5)
    gen = transformers.GenerationConfig.from_pretrained(out)
    assert (gen.bos_token_id, gen.eos_token_id, gen.pad_token_id) == (tok.bos_id, tok.eos_id, tok.pad_id)
    assert (pt.config.sep_token_id, pt.config.pad_token_id) == (tok.sep_id, tok.pad_id)


@pytest.mark.slow
def test_export_reads_one_tensor_at_a_time(tmp_path, monkeypatch):
    from gpt2_jax.checkpoints import orbax
    from gpt2_jax.checkpoints import hf
    from gpt2_jax.checkpoints import pretrained
    from gpt2_jax.model.config import ModelConfig
    from gpt2_jax.model.layout import param_shapes

    run(tmp_path, train__steps=2, checkpoint__every=0, mesh__data=2, mesh__fsdp=4)
    reads, held = [], []
    original_reader = orbax.Checkpointer.param_reader

    def spying_reader(self, step):
        shapes, read = original_reader(self, step)

        def spy(key):
            reads.append(key)
            return read(key)

        return shapes, spy

    original_write = hf._write_weights

    def spying_write(shapes, read, st, mp):
        import gc
        import weakref

        live = []  # weak references to every tensor read so far: at most one may be alive at a read

        def tracked(path):
            def alive():
                gc.collect()
                return sum(r() is not None for r in live)

            # Orbax restores on a thread pool: under load a pool thread may not yet have dropped its
            # reference to the last result when the next read starts. Ours must be gone; give theirs 2 s.
            n, deadline = alive(), time.time() + 2
            while n and time.time() < deadline:
                time.sleep(0.01)
                n = alive()
            held.append(n)
            value = read(path)
            live.append(weakref.ref(value))
            return value

        original_write(shapes, tracked, st, mp)

    monkeypatch.setattr(orbax.Checkpointer, "param_reader", spying_reader)
    monkeypatch.setattr(hf, "_write_weights", spying_write)
    out = pretrained.export_run(str(tmp_path / "run"), str(tmp_path / "export"))
    n_params = len(param_shapes(ModelConfig.from_json(str(tmp_path / "run" / "model_config.json"))))
    assert sorted(reads) == sorted(set(reads)) and len(reads) == n_params
    assert max(held) == 0  # the previous tensor is gone before the next one is read
    from gpt2_jax import load_pretrained

    ids = np.array([[1, 5, 7, 9]])
    np.testing.assert_array_equal(np.asarray(load_pretrained(out)(ids)), np.asarray(load_pretrained(str(tmp_path / "run"))(ids)))


def seed_shaped_news(tmp: Path, rows: int, rng) -> tuple[Path, list[str]]:
    """Headerless `title,keywords,content` CSV of Chinese news as the seed's users have it: ~2,000-character
    articles, 30 keywords a row taken from the article, and the characters of a BERT vocab.txt."""
    chars = [chr(c) for c in range(0x4E00, 0x4E00 + 400)]
    lines = []
    for _ in range(rows):
        text = "".join(rng.choice(chars, 2000))
        keywords = [text[i:i + 2] for i in rng.integers(0, 1998, 30)]
        lines.append(f"{''.join(rng.choice(chars, 16))},{' '.join(keywords)},{text}\n")
    path = tmp / "news.csv"
    path.write_text("".join(lines), encoding="utf-8")
    return path, ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "，", "。", *chars]


@pytest.mark.slow
def test_fine_tune_on_seed_shaped_news_exits_0_with_its_samples(tmp_path):
    """The fine-tune of issue 12: a GPT-2 with a BERT vocabulary, 30-keyword rows far longer than the window,
    loss on text only, the top block trained. Keyword lists are cut to half the window at data time, and the
    held-out samples adapt to the context (fewer tokens, or skipped), so the run ends with rc 0."""
    from conftest import make_hf_model

    rng = np.random.default_rng(0)
    train_csv, vocab = seed_shaped_news(tmp_path, 12, rng)
    val_csv = tmp_path / "val.csv"
    val_csv.write_text(train_csv.read_text(encoding="utf-8").splitlines()[0] + "\n"
                       + "".join(rng.choice(list(vocab[7:]), 140)) + ",新闻 报道,短文。\n", encoding="utf-8")
    model_dir = tmp_path / "bert-gpt2"
    make_hf_model(vocab_size=len(vocab), n_positions=128, attn_gain=1.0).save_pretrained(model_dir)
    (model_dir / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    proc = cli(tmp_path, model__init_from=model_dir, tokenizer__path="null", model__n_layer="null",
               model__n_embd="null", model__n_head="null", model__n_positions="null", data__train=train_csv,
               data__val=val_csv, data__max_length=128, data__loss_on="text", freeze__trainable="last_n_blocks",
               freeze__last_n_blocks=1, train__steps=4, train__batch_size=8, optim__grad_accum=1,
               checkpoint__every=0, sample__num=2, sample__max_new_tokens=80)
    _, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, stderr[-3000:]
    assert re.search(r"data: 12 of 12 training rows have a title \+ keywords longer than half of data.max_length=128 "
                     r"\(up to \d+ tokens\); their last keywords are dropped to fit 64 tokens", stderr), stderr
    assert re.search(r"\nwarning: held-out sample '.{16}' gets 6\d new tokens, not sample.max_new_tokens=80", stderr)
    assert re.search(r"\nwarning: held-out sample '.{140}' skipped: its prompt of 14\d tokens fills the context of "
                     r"128", stderr)
    assert stderr.count("[held-out] title: ") == 1
    # Each training row keeps a prompt of at most 64 tokens and trains on the text after it.
    from gpt2_jax import load_tokenizer

    tok = load_tokenizer(tmp_path / "run")
    corpus = tokenize_corpus(read_rows(train_csv), tok, tmp_path / "cache")
    news = batches.Batches(corpus, np.arange(12), bos_id=tok.bos_id, sep_id=tok.sep_id, eos_id=tok.eos_id,
                           pad_id=tok.pad_id, max_length=128, batch_size=12, loss_on="text", seed=0)
    b = news.local_batch(0)
    first_text = b["loss_mask"][0].argmax(axis=1)
    assert (first_text < 64).all() and (b["loss_mask"][0].sum(axis=1) >= 64).all()
    assert (b["input_ids"][0] == tok.sep_id).sum(axis=1).tolist() == [2] * 12


@pytest.mark.slow
@pytest.mark.parametrize("how", ["bitflip", "truncated", "empty", "meta"])
def test_a_damaged_newest_checkpoint_falls_back_on_load_and_resume(tmp_path, how, caplog):
    """Load and resume use the newest step that is complete and verifies, each with one warning naming the
    step skipped; resume sets the damaged step aside and trains past it again."""
    from conftest import damage

    from gpt2_jax import load_pretrained

    caplog.set_level(logging.INFO, logger="gpt2_jax")
    run(tmp_path)  # checkpoints 3 and 6
    reference = latest_state(tmp_path / "run")
    shutil.copytree(tmp_path / "run", tmp_path / "copy")
    damage(tmp_path / "run" / "checkpoints" / "6", how)
    caplog.clear()
    from gpt2_jax.checkpoints.hf import model_tensors

    shapes, read = model_tensors(load_pretrained(str(tmp_path / "run")))
    loaded = {k: read(k) for k in shapes}
    warned = log_lines(caplog, logging.WARNING, logger="")  # any warning counts, as any stderr line did
    intact = Checkpointer(str(tmp_path / "copy"), read_only=True)
    # The parameters of step 6 may have escaped the damage (the optimiser state took it): then step 6 loads.
    used = 3 if warned else 6
    want = intact.restore_params(used)
    intact.close()
    assert all(np.array_equal(loaded[k], want[k]) for k in want)
    if how in ("empty", "meta"):
        assert used == 3
    if warned:
        assert len(warned) == 1 and warned[0].startswith(f"{tmp_path / 'run'}: checkpoint step 6 skipped: "), warned
    caplog.clear()
    out = run(tmp_path)
    warned = log_lines(caplog, logging.WARNING)
    assert len(warned) == 1 and re.fullmatch(rf"checkpoint step 6 of {tmp_path / 'run'} skipped: .+", warned[0]), warned
    assert any(m.startswith("resumed from step 3") for m in log_lines(caplog)) and out["steps"] == 6
    assert [p.name.split("-")[0] for p in (tmp_path / "run" / "corrupt-checkpoints").iterdir()] == ["6"]
    again = latest_state(tmp_path / "run")  # steps 4-6 retrained from 3: the same state as the first time
    for k in reference:
        np.testing.assert_array_equal(again[k], reference[k], err_msg=k)


@pytest.mark.slow
def test_resume_false_keeps_the_old_checkpoints_until_the_new_run_has_one(tmp_path):
    run(tmp_path, train__steps=3)
    with pytest.raises(GPT2JaxError, match="does not exist"):
        run(tmp_path, checkpoint__resume="false", data__train=tmp_path / "missing.csv")
    assert latest_state(tmp_path / "run")["step"] == 3  # a run that never started removes nothing
    ckpts = tmp_path / "run" / "checkpoints"
    kept = tmp_path / "kept"
    shutil.copytree(ckpts / "3", kept)
    rng = np.random.default_rng(1)
    for attempt in range(4):  # kill -9 at random moments of a resume=false start-up
        proc = cli(tmp_path, checkpoint__resume="false", train__steps=6)
        time.sleep(rng.uniform(1.0, 12.0))
        proc.kill()
        proc.communicate()
        homes = [d / "3" for d in (tmp_path / "run").glob("checkpoints*") if (d / "3" / "meta").exists()]
        new = Checkpointer(str(tmp_path / "run"), read_only=True)
        finished_first = any(s >= 3 for s in new.all_steps()) and not list((tmp_path / "run").glob(
            "checkpoints.replaced-*"))
        new.close()
        assert finished_first or any(same_tree(h, kept) for h in homes), attempt
    out = run(tmp_path, checkpoint__resume="false")
    assert out["steps"] == 6 and not list((tmp_path / "run").glob("checkpoints.replaced-*"))


def same_tree(a: Path, b: Path) -> bool:
    files = lambda d: {p.relative_to(d): p.read_bytes() for p in d.rglob("*") if p.is_file()}  # noqa: E731
    return files(a) == files(b)


@pytest.mark.slow
def test_a_failed_runs_tokenizer_is_retrained_when_the_settings_differ(tmp_path, caplog):
    """A run that failed after training its tokenizer (here: max_length past n_positions) leaves it in out_dir;
    the next run asks for another vocabulary size and gets it, not the earlier tokenizer."""
    from gpt2_jax import load_tokenizer

    caplog.set_level(logging.INFO, logger="gpt2_jax")
    mine = dict(tokenizer__path="null", tokenizer__sentencepiece_vocab_size=400)
    with pytest.raises(GPT2JaxError, match="data.max_length=80 exceeds model n_positions=64"):
        run(tmp_path, data__max_length=80, **mine)
    assert len(load_tokenizer(tmp_path / "run" / "tokenizer")) <= 400
    caplog.clear()
    run(tmp_path, train__steps=1, checkpoint__every=0, **{**mine, "tokenizer__sentencepiece_vocab_size": 600})
    assert any(m.startswith("tokenizer: retraining") for m in log_lines(caplog))
    assert 400 < len(load_tokenizer(tmp_path / "run" / "tokenizer")) <= 600
    caplog.clear()
    run(tmp_path, train__steps=2, checkpoint__every=0, **{**mine, "tokenizer__sentencepiece_vocab_size": 600})
    assert not any("tokenizer: retraining" in m for m in log_lines(caplog))  # resumed: the same tokenizer


def test_a_run_directory_has_one_writer(tmp_path):
    """While one process holds train.out_dir, a second run there stops at once with one line naming the
    holder, before it writes anything; a run in the holding process itself goes on (the lock is re-entrant)."""
    import socket

    from gpt2_jax.checkpoints.run_lock import hold_run_dir

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    with hold_run_dir(str(run_dir)):
        proc = cli(tmp_path, train__steps=1, checkpoint__every=0)
        _, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 2, stderr[-3000:]
        assert stderr.strip() == (f"error: {run_dir} is in use by another run (pid {os.getpid()} on "
                                  f"{socket.gethostname()}); a run directory has one writer: wait for it to end, "
                                  f"or use another train.out_dir")
        assert [p.name for p in run_dir.iterdir()] == [".lock"]
        assert run(tmp_path, train__steps=1, checkpoint__every=0)["steps"] == 1


@pytest.mark.slow
def test_a_lock_left_by_a_killed_run_blocks_nothing(tmp_path):
    """kill -9 leaves RUN_DIR/.lock behind, unlocked: the next run takes it."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time\n"
                               "from gpt2_jax.checkpoints.run_lock import hold_run_dir\n"
                               f"with hold_run_dir({str(run_dir)!r}):\n"
                               "    print('held', flush=True)\n    time.sleep(300)\n"],
                              cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    holder.kill()
    holder.communicate()
    assert (run_dir / ".lock").read_text().split()[0] == str(holder.pid)
    assert run(tmp_path, train__steps=1, checkpoint__every=0)["steps"] == 1


@pytest.mark.slow
def test_ctrl_c_saves_the_current_step_in_one_line_and_resume_continues(tmp_path):
    """SIGINT, with a save every step (so that it likely lands in one): exit status 130, no traceback, one
    line naming the step saved; the run resumes from it."""
    proc = cli(tmp_path, train__steps=10_000, checkpoint__every=1)
    metrics = _wait_for_records(tmp_path / "run" / "metrics.jsonl", 3, poll=0.05)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    saved = Checkpointer(str(tmp_path / "run"), read_only=True).latest_step()
    lines = [l for l in re.split(r"[\r\n]", stderr) if "saved a checkpoint" in l]
    assert lines == [f"SIGINT (Ctrl-C): saved a checkpoint at step {saved} and stopped; re-run the same command "
                     f"to resume"], stderr[-3000:]
    out = run(tmp_path, train__steps=saved + 2, checkpoint__every=0)
    assert out["steps"] == saved + 2


@pytest.mark.slow
def test_checkpoints_set_aside_by_a_killed_resume_false_run_come_back(tmp_path, caplog):
    """A checkpoint.resume=false run killed after setting the earlier checkpoints aside, before its first
    checkpoint: the next default run moves them back (one line) and resumes; the next resume=false run
    drops them once it has a checkpoint of its own."""
    from gpt2_jax.checkpoints.resume import set_aside_replaced

    caplog.set_level(logging.INFO, logger="gpt2_jax")
    run(tmp_path, train__steps=3)
    run_dir = tmp_path / "run"
    assert set_aside_replaced(str(run_dir))  # what the killed run did
    caplog.clear()
    out = run(tmp_path, train__steps=4, checkpoint__every=0)
    moved = [m for m in log_lines(caplog) if "set aside: moved" in m]
    assert len(moved) == 1 and moved[0].startswith(f"{run_dir} had no checkpoint of its own"), log_lines(caplog)
    assert any(m.startswith("resumed from step 3") for m in log_lines(caplog)) and out["steps"] == 4
    assert not list(run_dir.glob("checkpoints.replaced-*"))
    set_aside_replaced(str(run_dir))
    out = run(tmp_path, train__steps=2, checkpoint__every=0, checkpoint__resume="false")
    assert out["steps"] == 2 and not list(run_dir.glob("checkpoints.replaced-*"))
    assert Checkpointer(str(run_dir), read_only=True).all_steps() == [2]
