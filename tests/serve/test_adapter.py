"""--adapter: the server folds a PEFT LoRA adapter into the model; its greedy text is PEFT's."""
import httpx
import peft
import torch
import transformers

from gpt2_jax.serve.server import load_service
from serve_fixtures import ServerThread


def test_an_adapter_serves_peft_greedy_text(model_dir, tokenizer, hf_greedy, tmp_path):
    base = transformers.GPT2LMHeadModel.from_pretrained(model_dir, attn_implementation="eager")
    torch.manual_seed(1)
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True,
                           init_lora_weights=False)
    pm = peft.get_peft_model(base, lora).eval()
    pm.save_pretrained(tmp_path / "adapter")
    ids = tokenizer.encode("the quick")
    with torch.no_grad():
        out = pm.generate(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                          max_new_tokens=12, do_sample=False, eos_token_id=tokenizer.eos_id,
                          pad_token_id=tokenizer.pad_id)[0, len(ids):].tolist()
    want = tokenizer.decode(out[:out.index(tokenizer.eos_id)] if tokenizer.eos_id in out else out)
    assert want != tokenizer.decode(hf_greedy(ids, 12)[0])  # the adapter changes the text
    service = load_service(model_dir, adapter=str(tmp_path / "adapter"), name="tiny", slots=4, max_queue=4,
                           warmup=False)
    with ServerThread(service) as server:
        r = httpx.post(server.url + "/v1/completions", json={"prompt": "the quick", "max_tokens": 12,
                                                             "temperature": 0}, timeout=60)
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == want
