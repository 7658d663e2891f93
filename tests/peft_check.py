"""PEFT adapters both ways, as a torch PEFT user does, under any transformers 4.x/5.x with its peft.

    python tests/peft_check.py load BASE ADAPTER EXPECTED.json [MERGED]
    python tests/peft_check.py make BASE ADAPTER_OUT IDS.json LOGITS_OUT.json

`load`: PeftModel.from_pretrained(GPT2LMHeadModel(BASE), ADAPTER) must raise no warning about adapter keys
(PEFT's only sign of a wrong prefix) and give EXPECTED's logits for its ids; with MERGED (our merged export),
merge_and_unload()'s weights must equal MERGED's, loaded as a plain AutoModelForCausalLM.
`make`: a LoRA adapter with random non-zero A and B saved by PEFT, and its logits for IDS.
Prints one JSON line; fails with an AssertionError naming what differs. tests/checkpoints/test_peft.py runs it.
"""
import json
import sys
import warnings

import numpy as np
import peft
import torch
import transformers

TOL = 1e-4


def base_model(path):
    return transformers.GPT2LMHeadModel.from_pretrained(path, attn_implementation="eager").eval()


def logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor(ids)).logits.float().numpy()


def load(base, adapter, expected, merged=None):
    with open(expected) as f:
        want = json.load(f)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pm = peft.PeftModel.from_pretrained(base_model(base), adapter).eval()
    words = ("adapter", "missing", "unexpected")
    bad = [str(w.message) for w in caught if any(s in str(w.message).lower() for s in words)]
    assert not bad, f"PEFT warned: {bad}"
    assert pm.peft_config["default"].fan_in_fan_out
    err = float(np.abs(logits(pm, want["ids"]) - np.asarray(want["logits"], np.float32)).max())
    assert err <= TOL, f"PeftModel's logits differ from ours by {err}"
    out = {"transformers": transformers.__version__, "peft": peft.__version__, "logits_err": err}
    if merged is not None:
        plain = transformers.AutoModelForCausalLM.from_pretrained(merged, attn_implementation="eager").eval()
        assert type(plain).__name__ == "GPT2LMHeadModel", type(plain)
        ref = pm.merge_and_unload().state_dict()
        ours = plain.state_dict()
        weights_err = 0.0
        for name, value in ref.items():
            assert name in ours, f"merged export lacks {name}"
            weights_err = max(weights_err, float((value.float() - ours[name].float()).abs().max()))
        assert weights_err <= 1e-5, f"merged weights differ from merge_and_unload()'s by {weights_err}"
        err = float(np.abs(logits(plain, want["ids"]) - np.asarray(want["logits"], np.float32)).max())
        assert err <= TOL, f"the merged export's logits differ from ours by {err}"
        out.update(merged_weights_err=weights_err, merged_logits_err=err)
    print(json.dumps(out))


def make(base, adapter_out, ids_path, logits_out):
    with open(ids_path) as f:
        ids = json.load(f)
    torch.manual_seed(1)
    cfg = peft.LoraConfig(r=4, lora_alpha=6, target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True,
                          init_lora_weights=False, task_type="CAUSAL_LM")
    pm = peft.get_peft_model(base_model(base), cfg).eval()
    pm.save_pretrained(adapter_out)
    with open(logits_out, "w") as f:
        json.dump(logits(pm, ids).tolist(), f)
    print(json.dumps({"transformers": transformers.__version__, "peft": peft.__version__}))


if __name__ == "__main__":
    {"load": load, "make": make}[sys.argv[1]](*sys.argv[2:])
