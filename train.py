"""Train or fine-tune GPT-2: `python train.py --config configs/demo.yaml [section.key=value ...]`.

Every key has a default (gpt2_jax/train/config.py); overrides are YAML values (`optim.lr=1e-3 train.steps=200`).
On a TPU pod, run the same command on every host.
"""
import argparse

from gpt2_jax.runtime import enable_compilation_cache, run_cli
from gpt2_jax.train.config import load_train_config


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="a YAML file in configs/ (default: every key's default)")
    p.add_argument("overrides", nargs="*", metavar="section.key=value")
    args = p.parse_args()
    cfg = load_train_config(args.config, args.overrides)

    # Imported once the config is read: the loop's imports (Orbax, Hugging Face I/O) take seconds that --help
    # and a config error need not wait for.
    from gpt2_jax.train.loop import train

    enable_compilation_cache()
    train(cfg)


if __name__ == "__main__":
    run_cli(main)
