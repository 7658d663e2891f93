"""Load a gpt2-jax export as a transformers user does, and check it against gpt2-jax's own numbers.

    python tests/hf_export_check.py HF_DIR EXPECTED.json [--tokenizer-only]

Runs under any transformers 4.x or 5.x with torch (tests/test_demo.py runs it under both). EXPECTED holds
gpt2-jax's token ids for some texts, its logits for a prompt, its greedy continuation with the top-2
margin of every step, and the generation defaults the run wrote. Prints one JSON line; fails with an
AssertionError naming what differs.
"""
import json
import re
import sys

import numpy as np
import torch
import transformers


# gpt2_jax.tokenizer's CJK ranges (this script runs where gpt2_jax is not installed).
CJK = "\u2e80-\u9fff\uf900-\ufaff\ufe30-\ufe4f\uff00-\uffef\U00020000-\U0003ffff"
CJK_GAP = re.compile(f"(?<=[{CJK}]) +(?=[{CJK}])")


def check_tokenizer(hf_dir: str, want: dict):
    """AutoTokenizer gives our ids, decodes as we do, and knows the special tokens' roles."""
    tok = transformers.AutoTokenizer.from_pretrained(hf_dir)
    assert len(tok) == want["vocab_size"], (len(tok), want["vocab_size"])
    for text, ids in want["encodings"]:
        got = tok(text).input_ids
        assert got == ids, f"ids of {text!r}: {got} != {ids}"
        for skip in (True, False):
            decoded = tok.decode(got, skip_special_tokens=skip)
            if want.get("join_cjk"):  # WordPiece puts spaces between Chinese characters; ours removes them
                decoded = CJK_GAP.sub("", decoded)
            assert decoded == want["decodings"][str(skip)][text], (text, skip, decoded)
    specials = {t: tok.convert_tokens_to_ids(t) for t in want["special_ids"]}
    assert specials == want["special_ids"], specials
    assert (tok.bos_token, tok.eos_token, tok.pad_token, tok.sep_token) == ("[BOS]", "[EOS]", "[PAD]", "[SEP]")
    return tok


def main(hf_dir: str, expected_path: str, mode: str = "") -> None:
    with open(expected_path) as f:
        want = json.load(f)
    tok = check_tokenizer(hf_dir, want)
    if mode == "--tokenizer-only":
        print(json.dumps({"transformers": transformers.__version__, "tokenizer": type(tok).__name__}))
        return
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    assert model.config.vocab_size == want["vocab_size"], model.config.vocab_size

    prompt = torch.tensor([want["prompt_ids"]])
    with torch.no_grad():
        logits = model(prompt).logits.float().numpy()
    err = float(np.abs(logits - np.asarray(want["logits"], np.float32)).max())
    assert err < 1e-4, f"logits differ by {err}"

    # Greedy with no penalty: the run's defaults in generation_config.json (repetition_penalty 2.0) would apply.
    greedy = model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False, repetition_penalty=1.0,
                            max_new_tokens=len(want["greedy"]), pad_token_id=tok.pad_token_id)[0, prompt.shape[1]:]
    greedy = greedy.tolist()
    for i, (a, b) in enumerate(zip(greedy, want["greedy"])):
        if a != b:  # only a near tie may go either way
            assert want["margins"][i] < 1e-4, f"greedy token {i}: {a} != {b} (top-2 margin {want['margins'][i]})"
            break
    gen = transformers.GenerationConfig.from_pretrained(hf_dir)
    for key, value in want["generation"].items():
        assert getattr(gen, key) == value, (key, getattr(gen, key), value)
    sampled = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=8,
                             pad_token_id=tok.pad_token_id)  # the run's sampling defaults
    assert sampled.shape[1] > prompt.shape[1]
    print(json.dumps({"transformers": transformers.__version__, "logits_max_abs_diff": err,
                      "greedy_equal": greedy == want["greedy"], "sample": tok.decode(sampled[0, prompt.shape[1]:])}))


if __name__ == "__main__":
    main(*sys.argv[1:])
