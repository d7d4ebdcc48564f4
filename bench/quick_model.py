"""A model dir for `make bench-quick`: the `test` preset with random weights, built in seconds.

Speed does not depend on what the weights learned, so the smoke check skips
training: a byte-level BPE tokenizer trained on a line of text, Transformer(test)
as initialised, saved as a checkpoint (torch-eager reads it) and exported as
every model dir is (verification pass included).

    python -m bench.quick_model --checkpoint checkpoints/bench-quick --out models/bench-quick
"""
from __future__ import annotations

import argparse
from pathlib import Path


def build(checkpoint_dir: Path, model_dir: Path) -> None:
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from export.model_dir import build_model_dir
    from model import Transformer, preset, save_checkpoint

    config = preset("test")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=config.vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(["def main(argv=None):\n    return parse(argv).run()\n"] * 50, trainer)
    torch.manual_seed(0)
    special = {"bos_token_id": 0, "eos_token_id": 0, "pad_token_id": None}
    save_checkpoint(checkpoint_dir, Transformer(config).eval(), tokenizer.to_str(), special)
    build_model_dir(checkpoint_dir, model_dir)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.quick_model", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    build(args.checkpoint, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
