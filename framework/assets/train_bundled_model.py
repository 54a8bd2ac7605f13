"""Train the bundled model: a tiny Llama on CPython's own reference docs.

    python -m framework.assets.train_bundled_model --out framework/assets/pydoc-llama

The corpus is `pydoc_data.topics.topics` (the text behind `help("for")`), which ships
with every CPython, so the model can be rebuilt offline. Seeds are fixed; the result
depends only on the Python version (the corpus) and the library versions.
"""

import argparse
import hashlib
import math
import time
from pathlib import Path

import torch
from pydoc_data.topics import topics
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

BOS, EOS, PAD = "<|begin_of_text|>", "<|end_of_text|>", "<|pad|>"
SPECIAL = [BOS, EOS, PAD, "<|system|>", "<|user|>", "<|assistant|>"]
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + eos_token + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)


def corpus() -> list[str]:
    """One document per pydoc topic, in sorted key order."""
    return [topics[key].strip() + "\n" for key in sorted(topics)]


def train_tokenizer(docs: list[str], vocab_size: int, max_len: int) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(docs, trainer=trainer)
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(  # prepend bos, as Llama 3 does
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD,
        model_max_length=max_len, chat_template=CHAT_TEMPLATE,
    )


def token_stream(tokenizer: PreTrainedTokenizerFast, docs: list[str]) -> torch.Tensor:
    """All documents as `bos doc eos`, concatenated."""
    ids = []
    for enc in tokenizer.backend_tokenizer.encode_batch(docs, add_special_tokens=False):
        ids += [tokenizer.bos_token_id, *enc.ids, tokenizer.eos_token_id]
    return torch.tensor(ids, dtype=torch.long)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("framework/assets/pydoc-llama"))
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--hidden-size", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--intermediate-size", type=int, default=768)  # a multiple of 128: int4 groups of 128 fit every layer
    p.add_argument("--max-len", type=int, default=512, help="max_position_embeddings")
    p.add_argument("--seq-len", type=int, default=256, help="training window")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--warmup", type=int, default=30)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()

    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    docs = corpus()
    text_hash = hashlib.sha256("".join(docs).encode()).hexdigest()[:16]
    print(f"corpus: {len(docs)} topics, {sum(map(len, docs))} chars, sha256[:16]={text_hash}")

    tokenizer = train_tokenizer(docs, args.vocab_size, args.max_len)
    data = token_stream(tokenizer, docs)
    print(f"tokenizer: vocab {len(tokenizer)}, corpus {len(data)} tokens, "
          f"bos/eos/pad = {tokenizer.bos_token_id}/{tokenizer.eos_token_id}/{tokenizer.pad_token_id}")

    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=args.hidden_size, num_hidden_layers=args.layers,
        num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
        intermediate_size=args.intermediate_size, max_position_embeddings=args.max_len,
        rope_theta=10000.0, rms_norm_eps=1e-5, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = LlamaForCausalLM(config)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params / 1e6:.2f}M parameters")

    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    schedule = lambda s: min(1.0, (s + 1) / args.warmup) * 0.5 * (1 + math.cos(math.pi * s / args.steps))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: max(schedule(s), 0.02))
    gen = torch.Generator().manual_seed(args.seed)
    model.train()
    start, avg = time.time(), None
    for step in range(args.steps):
        starts = torch.randint(0, len(data) - args.seq_len, (args.batch_size,), generator=gen)
        batch = torch.stack([data[s:s + args.seq_len] for s in starts.tolist()])
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step(), sched.step(), opt.zero_grad(set_to_none=True)
        avg = loss.item() if avg is None else 0.9 * avg + 0.1 * loss.item()
        if step % 20 == 0 or step == args.steps - 1:
            print(f"step {step:4d}  loss {loss.item():.3f}  avg {avg:.3f}  "
                  f"lr {sched.get_last_lr()[0]:.2e}  {time.time() - start:.0f}s", flush=True)

    args.out.mkdir(parents=True, exist_ok=True)
    model.eval().to(torch.bfloat16)
    model.config.dtype = torch.bfloat16
    model.generation_config = GenerationConfig(
        bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id, max_new_tokens=64)
    model.save_pretrained(args.out, safe_serialization=True)
    tokenizer.save_pretrained(args.out)
    print(f"saved to {args.out}: final loss {loss.item():.3f} (smoothed {avg:.3f}), "
          f"{time.time() - start:.0f}s of training")


if __name__ == "__main__":
    main()
