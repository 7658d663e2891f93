"""Export a training run's checkpoint as a Hugging Face GPT-2 directory, or a LoRA run's adapter for PEFT.

    python tools/export_hf.py --checkpoint runs/demo [--step N] --out exported/demo
    python tools/export_hf.py --checkpoint runs/lora --adapter-only --out exported/lora-adapter

Writes model.safetensors, flax_model.msgpack, config.json (with the special-token ids),
generation_config.json and the run's tokenizer; transformers loads it as GPT2LMHeadModel and
FlaxGPT2LMHeadModel. Only the parameters are read from the checkpoint, one tensor at a time, whatever
mesh wrote it: the optimiser state and the whole model are never in memory. A LoRA run exports the merged
model (its base with `W + scale * A @ B` folded in), a plain GPT-2.
--adapter-only writes a LoRA run's adapter alone, as PEFT saves one (adapter_config.json naming the base,
model.init_from, and adapter_model.safetensors): PeftModel.from_pretrained(base model, DIR) loads it.
"""
import argparse
from pathlib import Path

from gpt2_jax.errors import GPT2JaxError
from gpt2_jax.runtime import run_cli


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="the run directory (train.out_dir)")
    p.add_argument("--step", type=int, help="the checkpoint's step (default: the latest complete one)")
    p.add_argument("--out", required=True, help="the Hugging Face directory to write")
    p.add_argument("--adapter-only", action="store_true",
                   help="a LoRA run's adapter as a PEFT directory instead of the merged model")
    args = p.parse_args()
    # Checked before the export, which reads the whole checkpoint first.
    out = Path(args.out)
    blocker = next((d for d in (out, *out.parents) if d.exists() and not d.is_dir()), None)
    if blocker is not None:
        raise GPT2JaxError(f"--out {args.out} is a file, not a directory" if blocker == out
                           else f"--out {args.out}: {blocker} is a file, not a directory")

    from gpt2_jax.checkpoints.pretrained import export_adapter, export_run, is_run_dir

    if not is_run_dir(args.checkpoint):
        raise GPT2JaxError(f"{args.checkpoint} is not a training run directory (no model_config.json and "
                           f"checkpoints/ in it)")
    out = (export_adapter if args.adapter_only else export_run)(args.checkpoint, args.out, step=args.step)
    print(f"exported {args.checkpoint} to {out}")


if __name__ == "__main__":
    run_cli(main)
