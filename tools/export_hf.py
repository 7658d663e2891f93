"""Export a training run's checkpoint as a Hugging Face GPT-2 directory.

    python tools/export_hf.py --checkpoint runs/demo [--step N] --out exported/demo

Writes model.safetensors, flax_model.msgpack, config.json (with the special-token ids),
generation_config.json and the run's tokenizer; transformers loads it as GPT2LMHeadModel and
FlaxGPT2LMHeadModel. Only the parameters are read from the checkpoint, not the optimiser state.
"""
import argparse
import os

from gpt2_jax.errors import GPT2JaxError, run_cli


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="the run directory (train.out_dir)")
    p.add_argument("--step", type=int, help="the checkpoint's step (default: the latest complete one)")
    p.add_argument("--out", required=True, help="the Hugging Face directory to write")
    args = p.parse_args()

    from gpt2_jax.checkpoint import is_run_dir, load_run
    from gpt2_jax.hf import save_pretrained
    from gpt2_jax.tokenizer import load_tokenizer

    if not is_run_dir(args.checkpoint):
        raise GPT2JaxError(f"{args.checkpoint} is not a training run directory (no model_config.json and "
                           f"checkpoints/ in it)")
    model = load_run(args.checkpoint, step=args.step)
    tok = load_tokenizer(os.path.join(args.checkpoint, "tokenizer"))
    out = save_pretrained(model, args.out, tokenizer=tok)
    print(f"exported {args.checkpoint} to {out}")


if __name__ == "__main__":
    run_cli(main)
