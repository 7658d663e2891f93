"""Bad input gets 400 with OpenAI's error object and one clear line, through HTTP and the OpenAI client; the
server goes on serving."""
import httpx
import openai
import pytest

BAD = [  # (body, status, param, words the message must hold)
    (b'{"model": "tiny", "prompt": "a",', 400, None, ["not valid JSON", "line 1 column"]),
    (b"\xff\xfe", 400, None, ["not UTF-8"]),
    (b'["tiny"]', 400, None, ["must be a JSON object", "list"]),
    ({"model": "tiny", "prompt": "a", "max_tokens": "ten"}, 400, "max_tokens", ["'max_tokens' must be an integer"]),
    ({"model": "tiny", "prompt": "a", "temperature": "hot"}, 400, "temperature", ["must be a number", '"hot"']),
    ({"model": "tiny", "prompt": "a", "stream": "yes"}, 400, "stream", ["true or false"]),
    ({"model": "tiny", "prompt": [1, "a"]}, 400, "prompt", ["a list of token-id lists"]),
    ({"model": "tiny", "prompt": "a", "top_p": 0}, 400, "top_p", ["in (0, 1]", "got 0"]),
    ({"model": "tiny", "prompt": "a", "logprobs": 9}, 400, "logprobs", ["between 0 and 5"]),
    ({"model": "tiny", "prompt": "a", "stop": ["x", 3]}, 400, "stop", ["list of strings"]),
    ({"model": "tiny", "prompt": "a", "min_tokens": 20}, 400, "min_tokens", ["must not exceed 'max_tokens' (16)"]),
    ({"model": "tiny", "prompt": "a", "logit_bias": {"1": 5}}, 400, "logit_bias", ["not supported"]),
    ({"model": "tiny", "prompt": "a", "keyword_boost": 3}, 400, "keyword_boost", ["needs 'keywords'"]),
    ({"model": "tiny"}, 400, "prompt", ["'prompt' is required"]),
    ({"model": "gpt-4", "prompt": "a"}, 400, "model", ["`gpt-4` does not exist", "serves `tiny`"]),
    ({"model": "tiny", "prompt": [5, 300]}, 400, "prompt", ["token id 300", "vocabulary [0, 300)"]),
    ({"model": "tiny", "prompt": [7] * 250, "max_tokens": 10}, 400, "max_tokens",
     ["maximum context length is 256 tokens", "requested 260 tokens (250 in the prompt, 10 for the completion)"]),
    ({"model": "tiny", "prompt": [7] * 300}, 400, "prompt", ["maximum context length is 256", "300 in the prompt"]),
    ({"model": "tiny", "prompt": "a", "keywords": " ".join(f"k{i}" for i in range(20)), "keyword_boost": 1,
      "stream": True}, 400, None, ["at most 16 keyword"]),
    ({"model": "tiny", "prompt": "a", "n": 100}, 400, "n",
     ["100 completions", "at most 68 at once (4 slots, a queue of 64)"]),
]


@pytest.mark.parametrize("body, status, param, words", BAD, ids=[str(i) for i in range(len(BAD))])
def test_bad_requests_get_one_clear_error(server, body, status, param, words):
    kw = {"content": body} if isinstance(body, bytes) else {"json": body}
    r = httpx.post(server.url + "/v1/completions", timeout=60, **kw)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"
    assert error["param"] == param
    assert "\n" not in error["message"] and all(w in error["message"] for w in words), error["message"]


def test_the_openai_client_sees_the_errors(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="other", prompt="a")
    assert e.value.status_code == 400 and e.value.code == "model_not_found"
    assert "`other` does not exist" in e.value.message
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="tiny", prompt="a", max_tokens=1000)
    assert e.value.code == "context_length_exceeded" and "256" in e.value.message
    assert client.completions.create(model="tiny", prompt="a", max_tokens=2).choices[0].finish_reason


def test_unknown_paths_and_methods_get_error_objects(server):
    r = httpx.get(server.url + "/v1/nothing")
    assert r.status_code == 404 and r.json()["error"]["message"] == "Not Found"
    r = httpx.get(server.url + "/v1/completions")
    assert r.status_code == 405 and "error" in r.json()


def test_a_request_without_model_gets_the_served_one(server):
    r = httpx.post(server.url + "/v1/completions", json={"prompt": "a", "max_tokens": 2}, timeout=60)
    assert r.status_code == 200 and r.json()["model"] == "tiny"
