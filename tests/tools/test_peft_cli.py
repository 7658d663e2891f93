"""tools/generate.py --adapter with an adapter torch PEFT made, against PEFT's own greedy generate."""
import importlib.util
import sys
from pathlib import Path

import peft
import pytest
import torch
import transformers

from gpt2_jax.runtime import run_cli
from gpt2_jax.tokenizer import load_tokenizer, train_bpe

ROOT = Path(__file__).resolve().parents[2]

CORPUS = ["the quick brown fox jumps over the lazy dog", "a title about foxes and dogs", "keywords make prompts",
          "sampling from a language model", "jax compiles one loop"] * 20


def run_tool(name: str, args: list, monkeypatch, capsys) -> tuple:
    """(exit status, stdout, stderr) of tools/NAME.py with `args`, run through run_cli as its __main__ does."""
    spec = importlib.util.spec_from_file_location(f"tool_{name}", ROOT / "tools" / f"{name}.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    monkeypatch.setattr(sys, "argv", [f"{name}.py", *map(str, args)])
    try:
        run_cli(tool.main)
        code = 0
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def base_and_adapter(tmp_path_factory):
    """A random GPT-2 with its BPE tokenizer, and a random non-zero LoRA adapter for it saved by torch PEFT."""
    root = tmp_path_factory.mktemp("peft_cli")
    tok = train_bpe(CORPUS, root / "model", vocab_size=300)
    cfg = transformers.GPT2Config(vocab_size=len(tok), n_positions=64, n_embd=32, n_layer=2, n_head=4,
                                  initializer_range=0.4, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id)
    torch.manual_seed(0)
    transformers.GPT2LMHeadModel(cfg).save_pretrained(root / "model")
    base = transformers.GPT2LMHeadModel.from_pretrained(root / "model", attn_implementation="eager")
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True,
                           init_lora_weights=False)
    pm = peft.get_peft_model(base, lora).eval()
    pm.save_pretrained(root / "adapter")
    return str(root / "model"), str(root / "adapter"), pm


def test_generate_with_an_adapter_gives_peft_greedy_text(base_and_adapter, monkeypatch, capsys):
    model_dir, adapter_dir, pm = base_and_adapter
    tok = load_tokenizer(model_dir)
    prompt = tok.encode("the quick")
    with torch.no_grad():
        out = pm.generate(input_ids=torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                          max_new_tokens=12, do_sample=False, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)
    ids = out[0, len(prompt):].tolist()
    want = tok.decode(ids[:ids.index(tok.eos_id)] if tok.eos_id in ids else ids)

    args = ["--model", model_dir, "--prompt", "the quick", "--greedy", "--max-new-tokens", "12", "--no-compile-cache"]
    code, got, _ = run_tool("generate", args + ["--adapter", adapter_dir], monkeypatch, capsys)
    assert code == 0 and got == want + "\n"
    code, base_text, _ = run_tool("generate", args, monkeypatch, capsys)
    assert code == 0 and base_text != got  # the adapter changes the text


def test_generate_with_a_bad_adapter_is_one_line(base_and_adapter, tmp_path, monkeypatch, capsys):
    model_dir, _, _ = base_and_adapter
    code, _, err = run_tool("generate", ["--model", model_dir, "--prompt", "x", "--adapter", str(tmp_path)],
                            monkeypatch, capsys)
    assert code == 2 and err.strip().splitlines() == [f"error: {tmp_path}: no adapter_config.json: not a PEFT "
                                                      f"adapter directory"]
