"""What a resumed run may change: one list (RESUMABLE_CHANGES) for the config's keys and the model fields they
set; any other change to the config, the model or the tokenizer is refused with the changed keys named."""
import re

import pytest

from gpt2_jax.checkpoints.resume import check_resumable, resume_changes
from gpt2_jax.errors import GPT2JaxError
from gpt2_jax.train.config import load_train_config

MODEL = {"n_layer": 2, "n_embd": 32, "attn_pdrop": 0.1, "embd_pdrop": 0.1, "resid_pdrop": 0.1, "dtype": "float32",
         "param_dtype": "float32"}
TOKENIZER = {"size": 404, "special_ids": {"bos": 400}}


def meta(*overrides, model=None, tokenizer=None) -> dict:
    return {"config": load_train_config(None, list(overrides)).to_dict(), "model": {**MODEL, **(model or {})},
            "tokenizer": {**TOKENIZER, **(tokenizer or {})}}


def test_config_changes_split_into_breaking_and_harmless():
    base = meta()
    changed = meta("train.steps=99", "optim.lr=1e-2", "mesh.fsdp=2", "model.n_embd=64", "data.max_length=64")
    breaking, harmless = resume_changes(base, changed)
    assert [c.split(":")[0] for c in breaking] == ["data.max_length", "model.n_embd"]
    assert [c.split(":")[0] for c in harmless] == ["mesh.fsdp", "optim.lr", "train.steps"]
    harmless = check_resumable(base, meta("train.steps=99"), "RUN")
    assert harmless == [f"train.steps: {base['config']['train']['steps']!r} -> 99"]
    with pytest.raises(GPT2JaxError, match=r"cannot resume RUN: .*data.max_length: \d+ -> 64; model.n_embd"):
        check_resumable(base, changed, "RUN")


def test_dropout_and_compute_dtype_change_with_the_model_fields_they_set():
    base = meta("model.dropout=0.1", model={"attn_pdrop": 0.1, "embd_pdrop": 0.1, "resid_pdrop": 0.1})
    other = meta("model.dropout=0.0", "model.dtype=bfloat16",
                 model={"attn_pdrop": 0.0, "embd_pdrop": 0.0, "resid_pdrop": 0.0, "dtype": "bfloat16"})
    assert check_resumable(base, other, "RUN") == ["model.dropout: 0.1 -> 0.0", "model.dtype: 'float32' -> 'bfloat16'"]


@pytest.mark.parametrize("model, tokenizer, named", [
    ({"n_layer": 3}, None, "the model's n_layer: 2 -> 3"),
    ({"param_dtype": "bfloat16"}, None, "the model's param_dtype: 'float32' -> 'bfloat16'"),
    ({"n_layer": 3, "attn_pdrop": 0.0}, None, "the model's n_layer: 2 -> 3"),  # the dropout rate is not named
    (None, {"size": 604}, "the tokenizer's size: 404 -> 604"),
])
def test_a_model_or_tokenizer_the_config_does_not_name_is_refused(model, tokenizer, named):
    """model.init_from's config.json, or the tokenizer, changed under an unchanged config."""
    with pytest.raises(GPT2JaxError, match=rf"^cannot resume RUN: .* \({re.escape(named)}\); use another"):
        check_resumable(meta(), meta(model=model, tokenizer=tokenizer), "RUN")
