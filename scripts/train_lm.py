"""Train a small GPT-2- or Llama-architecture causal LM on a text file (tinyshakespeare by default) with accelerate.

    python scripts/train_lm.py --arch gpt2 --d-model 128 --layers 4 --out runs/lm-gpt2-d128 [--steps 800]
    python scripts/train_lm.py --arch llama --d-model 128 --layers 4 --out runs/lm-llama-d128

A byte-level BPE tokenizer is trained on the first 90% of the text (the rest is the validation split) and saved
with the model, so the output is a normal HF directory that `hf-fibration compress DIR` and AutoModelForCausalLM
load. Training data: contiguous blocks of --block tokens; AdamW with warmup; the best weights by val loss are
kept. results.json records val loss, parameters, wall time, machine and command.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import transformers as T

from hf_fibration.evaluation.evalset import evaluate_loss
from hf_fibration.evaluation.results_io import command_line, print_preamble
from hf_fibration.research.causal_lm import SHAKESPEARE, blocks, split_text
from hf_fibration.research.training_runs import parameter_counts, save_results, size_text
from hf_fibration.training.retune import retune

EOS = "<|endoftext|>"


def train_tokenizer(text: str, out: Path, vocab_size: int) -> T.PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([text[i:i + 10_000] for i in range(0, len(text), 10_000)],
                            trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS],
                                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    wrapped = T.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, bos_token=EOS, unk_token=EOS,
                                        pad_token=EOS, model_max_length=1024)
    wrapped.save_pretrained(out)
    return wrapped


def build_model(arch: str, vocab: int, d_model: int, layers: int, heads: int, ffn: int | None, block: int):
    if arch == "gpt2":
        config = T.GPT2Config(vocab_size=vocab, n_positions=block, n_embd=d_model, n_layer=layers, n_head=heads,
                              n_inner=ffn or 4 * d_model, bos_token_id=0, eos_token_id=0, pad_token_id=0,
                              resid_pdrop=0.1, embd_pdrop=0.1, attn_pdrop=0.1)
        return T.GPT2LMHeadModel(config)
    if arch == "llama":
        config = T.LlamaConfig(vocab_size=vocab, hidden_size=d_model, intermediate_size=ffn or 8 * d_model // 3,
                               num_hidden_layers=layers, num_attention_heads=heads,
                               num_key_value_heads=max(1, heads // 2), max_position_embeddings=block,
                               bos_token_id=0, eos_token_id=0, pad_token_id=0, tie_word_embeddings=True)
        return T.LlamaForCausalLM(config)
    raise SystemExit(f"Unknown --arch {arch!r}; choose gpt2 or llama.")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(SHAKESPEARE), help="a UTF-8 text file")
    parser.add_argument("--out", required=True)
    parser.add_argument("--arch", default="gpt2", choices=("gpt2", "llama"))
    parser.add_argument("--d-model", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--ffn", type=int, help="MLP width (default: 4·d for gpt2, 8/3·d for llama)")
    parser.add_argument("--vocab", type=int, default=1024)
    parser.add_argument("--block", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=800)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--eval-every", type=int, default=200)
    parser.add_argument("--val-blocks", type=int, default=256)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    data, out = Path(args.data), Path(args.out)
    if not data.exists():
        raise SystemExit(f"Training text not found at {data}; pass --data.")
    head = print_preamble(command_line(__file__, argv))
    train_text, val_text = split_text(data)
    out.mkdir(parents=True, exist_ok=True)
    if (out / "tokenizer.json").exists():
        tokenizer = T.AutoTokenizer.from_pretrained(out)
    else:
        tokenizer = train_tokenizer(train_text, out, args.vocab)
    torch.manual_seed(args.seed)
    model = build_model(args.arch, len(tokenizer), args.d_model, args.layers, args.heads, args.ffn, args.block)
    train = blocks(tokenizer, train_text, args.block, args.batch_size)
    val = blocks(tokenizer, val_text, args.block, 64, args.val_blocks)
    epochs = -(-args.steps // len(train.batches))
    print(f"{len(train.batches)} train batches/epoch, {epochs} epoch(s); {size_text(model)}", flush=True)
    start = time.perf_counter()
    result = retune(model, train, val, epochs=epochs, max_steps=args.steps, learning_rate=args.lr,
                    patience=10**9, eval_every=args.eval_every, output_dir=out, resume=args.resume,
                    betas=(0.9, 0.95), warmup_steps=args.warmup, seed=args.seed, progress=not args.no_progress)
    seconds = time.perf_counter() - start
    model.eval()
    model.save_pretrained(out)
    record = {
        "arch": args.arch, "d_model": args.d_model, "layers": args.layers, **parameter_counts(model),
        "steps": result.steps,
        "val_loss": evaluate_loss(model, val), "train_seconds_this_run": round(seconds, 1),
        "history": result.history,
    }
    return save_results(out, head, record)


if __name__ == "__main__":
    main()
