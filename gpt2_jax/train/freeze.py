"""Which parameters train: a pure function of parameter paths (`transformer/h/11/attn/c_attn/kernel`).

Presets:
- `all`: every parameter.
- `head`: the LM head, which GPT-2 ties to the token embedding `transformer/wte/embedding` (as the seed
  project did). Its gradient also flows in through the input embedding, so the backward pass still runs
  through every block; only the weight gradients and optimiser state of the blocks are saved.
- `last_n_blocks`: the top N blocks and the final LayerNorm `ln_f` (which only they feed). The tied head /
  embedding stays frozen, so the backward pass stops at block L-N: both time and memory shrink.
- `patterns`: regular expressions searched in each path (`h/1[01]/`, `ln_f`, `attn/c_attn/bias$`).

With LoRA adapters (`lora.rank > 0`) the adapters train and the base is frozen; the preset then names the
base parameters that train beside them (`head`: LoRA plus a trainable head), and `all`, the default, none.
"""
from __future__ import annotations

import re
from typing import Iterable

from gpt2_jax.errors import GPT2JaxError
from gpt2_jax.model.lora import is_adapter

TRAINABLE = ("all", "head", "last_n_blocks", "patterns")  # freeze.trainable

HEAD = "transformer/wte/embedding"
_BLOCK = re.compile(r"transformer/h/(\d+)/")


def trainable_paths(paths: Iterable[str], trainable: str, *, n_layer: int, last_n_blocks: int = 6,
                    patterns: Iterable[str] = ()) -> set[str]:
    """The subset of `paths` that trains under the freeze preset `trainable`: with adapter keys among the
    paths (`.../lora_a`, `.../lora_b`), every adapter and the base parameters the preset names (none for
    `all`)."""
    paths = list(paths)
    adapters = {p for p in paths if is_adapter(p)}
    if adapters:
        base = [p for p in paths if p not in adapters]
        return adapters | (set() if trainable == "all" else
                           _base_paths(base, trainable, n_layer, last_n_blocks, patterns))
    return _base_paths(paths, trainable, n_layer, last_n_blocks, patterns)


def _base_paths(paths: list[str], trainable: str, n_layer: int, last_n_blocks: int,
                patterns: Iterable[str]) -> set[str]:
    if trainable == "all":
        chosen = set(paths)
    elif trainable == "head":
        chosen = {p for p in paths if p == HEAD}
    elif trainable == "last_n_blocks":
        if not 1 <= last_n_blocks <= n_layer:
            raise GPT2JaxError(f"freeze.last_n_blocks={last_n_blocks} must be between 1 and n_layer={n_layer}")
        first = n_layer - last_n_blocks
        chosen = {p for p in paths if p.startswith("transformer/ln_f/")
                  or ((m := _BLOCK.match(p)) is not None and int(m.group(1)) >= first)}
    elif trainable == "patterns":
        chosen = set()
        for pattern in patterns:
            try:
                regex = re.compile(pattern)
            except re.error as e:
                raise GPT2JaxError(f"freeze.patterns: {pattern!r} is not a regular expression ({e})") from None
            matched = {p for p in paths if regex.search(p)}
            if not matched:
                raise GPT2JaxError(f"freeze.patterns: {pattern!r} matches no parameter (paths look like {HEAD}, "
                                   f"transformer/h/0/attn/c_attn/kernel)")
            chosen |= matched
    else:
        raise GPT2JaxError(f"unknown freeze.trainable {trainable!r}; known: {', '.join(TRAINABLE)}")
    if not chosen:
        raise GPT2JaxError(f"freeze.trainable={trainable} leaves no parameter to train")
    return chosen
