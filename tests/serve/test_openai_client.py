"""/v1/completions through the official OpenAI client (and curl) against a real server over the real engine and a
tiny model; texts and log-probabilities checked against transformers."""
import json
import shutil
import subprocess

import httpx
import numpy as np
import pytest
import torch

from gpt2_jax.errors import GPT2JaxError
from gpt2_jax.serve.server import load_service
from serve_fixtures import ServerThread


def test_greedy_completion_equals_transformers(client, tokenizer, hf_greedy):
    prompt = "the quick brown fox"
    ids = tokenizer.encode(prompt)
    want, eos = hf_greedy(ids, 24)
    r = client.completions.create(model="tiny", prompt=prompt, max_tokens=24, temperature=0)
    assert r.object == "text_completion" and r.model == "tiny" and r.id.startswith("cmpl-")
    assert [c.text for c in r.choices] == [tokenizer.decode(want)]
    assert r.choices[0].finish_reason == ("stop" if eos else "length")
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(ids), len(want) + eos)
    assert r.usage.total_tokens == len(ids) + len(want) + eos


def test_stream_gives_the_whole_completion(client):
    kw = dict(model="tiny", prompt=["a title about", "jax"], max_tokens=20, temperature=0.8, seed=11, n=2,
              logprobs=2)
    whole = client.completions.create(**kw)
    chunks = list(client.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    texts, reasons, logprobs = {}, {}, {}
    for ch in chunks[:-1]:
        assert ch.id == chunks[0].id and ch.usage is None and len(ch.choices) == 1
        c = ch.choices[0]
        texts[c.index] = texts.get(c.index, "") + c.text
        for key in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
            logprobs.setdefault(c.index, {}).setdefault(key, []).extend(getattr(c.logprobs, key) or [])
        assert c.index not in reasons, "a chunk after the choice's finish_reason"
        if c.finish_reason is not None:
            reasons[c.index] = c.finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage
    assert texts == {c.index: c.text for c in whole.choices}
    assert reasons == {c.index: c.finish_reason for c in whole.choices}
    assert logprobs == {c.index: c.logprobs.model_dump() for c in whole.choices}


def test_the_stream_ends_with_done(server):
    body = {"model": "tiny", "prompt": "the", "max_tokens": 5, "stream": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
    assert json.loads(events[-2][6:])["choices"][0]["finish_reason"] in ("stop", "length")


def test_prompt_forms_and_n(client, tokenizer):
    a, b = "the lazy dog", "keywords make"
    texts = lambda r: [c.text for c in sorted(r.choices, key=lambda c: c.index)]  # noqa: E731
    by_text = client.completions.create(model="tiny", prompt=[a, b], max_tokens=8, temperature=0, n=2)
    assert [c.index for c in by_text.choices] == [0, 1, 2, 3]
    ids = [tokenizer.encode(a), tokenizer.encode(b)]
    by_ids = client.completions.create(model="tiny", prompt=ids, max_tokens=8, temperature=0, n=2)
    one = client.completions.create(model="tiny", prompt=ids[1], max_tokens=8, temperature=0)
    assert texts(by_ids) == texts(by_text)
    t = texts(by_text)
    assert t[0] == t[1] and t[2] == t[3] == one.choices[0].text  # greedy: n copies
    assert by_ids.usage.prompt_tokens == len(ids[0]) + len(ids[1])  # each prompt counted once, as vLLM


def test_seeded_sampling_is_repeatable(client):
    kw = dict(model="tiny", prompt="sampling from", max_tokens=16, temperature=0.9, top_p=0.95,
              extra_body={"top_k": 40, "repetition_penalty": 1.3})
    first = [c.text for c in client.completions.create(seed=7, n=3, **kw).choices]
    assert [c.text for c in client.completions.create(seed=7, n=3, **kw).choices] == first
    assert len(set(first)) == 3  # the n choices are different samples
    assert client.completions.create(seed=7, **kw).choices[0].text == first[0]
    assert client.completions.create(seed=8, **kw).choices[0].text != first[0]


def test_top_k_and_repetition_penalty_are_transformers(client, tokenizer, hf_model):
    ids = tokenizer.encode("the lazy dog")
    with torch.no_grad():
        want = hf_model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                 max_new_tokens=20, min_new_tokens=20, do_sample=False, repetition_penalty=1.8,
                                 pad_token_id=tokenizer.pad_id)[0, len(ids):].tolist()
    kw = dict(model="tiny", prompt=ids, max_tokens=20)
    penalised = client.completions.create(temperature=0, extra_body={"repetition_penalty": 1.8, "min_tokens": 20},
                                          **kw)
    assert penalised.choices[0].text == tokenizer.decode(want)
    # top_k 1 leaves one token to sample: greedy, whatever the seed and temperature.
    greedy = client.completions.create(temperature=0, **kw).choices[0].text
    assert greedy != penalised.choices[0].text
    top1 = client.completions.create(temperature=1.5, seed=4, n=2, extra_body={"top_k": 1}, **kw)
    assert [c.text for c in top1.choices] == [greedy, greedy]


def test_min_tokens_holds_eos_back(client):
    r = client.completions.create(model="tiny", prompt="the", max_tokens=30, temperature=0.7, seed=1, n=4,
                                  extra_body={"min_tokens": 30})
    assert all(c.finish_reason == "length" for c in r.choices) and r.usage.completion_tokens == 4 * 30


def test_title_and_keywords_build_the_prompt(client, tokenizer, hf_greedy):
    ids = tokenizer.format_prompt("foxes", "dog jax")
    want, _ = hf_greedy(ids, 16)
    r = client.completions.create(model="tiny", prompt=None, max_tokens=16, temperature=0, echo=True,
                                  extra_body={"title": "foxes", "keywords": ["dog", "jax"]})
    head = tokenizer.decode(ids, skip_special_tokens=False)
    assert head.startswith("[BOS]") and r.choices[0].text == head + tokenizer.decode(want)
    assert r.usage.prompt_tokens == len(ids)
    # The prompt's text continues the formatted prompt; a large boost writes the keywords in.
    cont = client.completions.create(model="tiny", prompt=" the", max_tokens=16, temperature=0,
                                     extra_body={"title": "foxes", "keywords": "dog jax"})
    assert cont.choices[0].text == tokenizer.decode(hf_greedy(ids + tokenizer.encode(" the"), 16)[0])
    boosted = client.completions.create(model="tiny", prompt="", max_tokens=40, temperature=0, extra_body={
        "title": "foxes", "keywords": "dog jax", "keyword_boost": 100.0, "min_tokens": 40})
    assert "dog" in boosted.choices[0].text and "jax" in boosted.choices[0].text


def test_stop_strings_cut_the_text(client, tokenizer, hf_greedy):
    ids = tokenizer.encode("the quick")
    full = tokenizer.decode(hf_greedy(ids, 40)[0])
    stop = full[6:9]
    at = full.find(stop)
    kw = dict(model="tiny", prompt="the quick", max_tokens=40, temperature=0)
    for stream in (False, True):
        r = client.completions.create(stop=[stop, "never written"], stream=stream, **kw)
        chunks = list(r) if stream else [r]
        text = "".join(c.choices[0].text for c in chunks)
        assert text == full[:at] and chunks[-1].choices[0].finish_reason == "stop"
        assert chunks[-1].choices[0].model_extra["stop_reason"] == stop
    kept = client.completions.create(stop=stop, extra_body={"include_stop_str_in_output": True}, **kw)
    assert kept.choices[0].text == full[:at + len(stop)]


def test_echo_and_logprobs_equal_transformers(client, tokenizer, hf_model):
    ids = tokenizer.encode("jax compiles")
    r = client.completions.create(model="tiny", prompt="jax compiles", max_tokens=6, temperature=0, echo=True,
                                  logprobs=3, extra_body={"min_tokens": 6})
    c = r.choices[0]
    assert c.text.startswith("jax compiles")
    lp = c.logprobs
    with torch.no_grad():
        all_ids = hf_model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                    max_new_tokens=6, min_new_tokens=6, do_sample=False,
                                    pad_token_id=tokenizer.pad_id)[0].tolist()
        ref = torch.log_softmax(hf_model(torch.tensor([all_ids])).logits[0].double(), -1).numpy()
    assert lp.tokens == [tokenizer.decode([t], skip_special_tokens=False) for t in all_ids]
    want = [None] + [ref[i - 1, t] for i, t in enumerate(all_ids) if i]
    assert lp.token_logprobs[0] is None and len(lp.token_logprobs) == len(all_ids) == len(ids) + 6
    np.testing.assert_allclose(lp.token_logprobs[1:], want[1:], atol=2e-4)
    text = lambda t: tokenizer.decode([int(t)], skip_special_tokens=False)  # noqa: E731
    for i, top in enumerate(lp.top_logprobs[1:], start=1):
        want = {text(all_ids[i]): ref[i - 1, all_ids[i]]}  # the chosen token, then the three likeliest
        for t in np.argsort(-ref[i - 1])[:3]:
            want.setdefault(text(t), ref[i - 1, t])
        assert list(top) == list(want)
        np.testing.assert_allclose(list(top.values()), list(want.values()), atol=2e-4)
    assert lp.text_offset[0] == 0 and lp.text_offset[len(ids)] == len("".join(lp.tokens[:len(ids)]))
    # Greedy: each new token is the most likely one.
    assert all(max(top.values()) == v for top, v in zip(lp.top_logprobs[len(ids):], lp.token_logprobs[len(ids):]))


def test_models_and_health(server):
    models = httpx.get(server.url + "/v1/models").json()
    assert [m["id"] for m in models["data"]] == ["tiny"] and models["data"][0]["max_model_len"] == 256
    health = httpx.get(server.url + "/health")
    assert health.status_code == 200 and health.json()["status"] == "ok"


def test_curl(server, tokenizer):
    body = json.dumps({"model": "tiny", "prompt": "the", "max_tokens": 4, "temperature": 0})
    curl = ["curl", "-sS", "--max-time", "60", server.url + "/v1/completions", "-H", "Content-Type: application/json"]
    whole = json.loads(subprocess.run(curl + ["-d", body], capture_output=True, text=True, check=True).stdout)
    assert whole["choices"][0]["finish_reason"] in ("stop", "length")
    assert whole["usage"]["prompt_tokens"] == len(tokenizer.encode("the"))
    streamed = subprocess.run(curl + ["-N", "-d", body[:-1] + ', "stream": true}'], capture_output=True, text=True,
                              check=True).stdout
    events = [e for e in streamed.split("\n\n") if e]
    assert events[-1] == "data: [DONE]"
    assert "".join(json.loads(e[6:])["choices"][0]["text"] for e in events[:-1]) == whole["choices"][0]["text"]


def test_the_generation_config_sets_request_defaults(model_dir, tmp_path, tokenizer, hf_greedy):
    model = tmp_path / "model"
    shutil.copytree(model_dir, model)
    (model / "generation_config.json").write_text(json.dumps({"do_sample": True, "max_new_tokens": 7, "top_k": 1,
                                                              "temperature": 0.8}))
    service = load_service(str(model), name="tiny", slots=4, max_queue=4, warmup=False)
    assert service.defaults == {"max_tokens": 7, "top_k": 1, "temperature": 0.8}
    with ServerThread(service) as server:
        r = httpx.post(server.url + "/v1/completions", json={"prompt": [5, 6, 7], "min_tokens": 7}, timeout=60)
        assert r.json()["usage"]["completion_tokens"] == 7  # max_tokens 7; top_k 1: greedy
        assert r.json()["choices"][0]["text"] == tokenizer.decode(hf_greedy([5, 6, 7], 7)[0])
        r = httpx.post(server.url + "/v1/completions", json={"prompt": "a", "max_tokens": 3}, timeout=60)
        assert r.json()["usage"]["completion_tokens"] <= 3
    (model / "generation_config.json").write_text(json.dumps({"top_p": 1.5}))
    with pytest.raises(GPT2JaxError, match=r"generation_config.json: 'top_p' must be in \(0, 1\], got 1.5"):
        load_service(str(model), warmup=False)
