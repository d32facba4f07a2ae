"""Train quantkit's bundled reference models: a byte-level BPE tokenizer and two Llama models.

The target (about 8.4M parameters, grouped-query attention, hidden 256, 8 layers, context 1024)
and the draft (about 1.6M parameters, same tokenizer, for speculative decoding) are trained on
the English Wikipedia articles in ../shared/data/wikipedia-en, minus the held-out articles that
`calibration_data/wikipedia/heldout.jsonl.gz` keeps for evaluation (the last 150 articles of
wiki_part03). WikiText-2 test never enters training.

Each model trains for a wall-clock budget with a time-based warm-up + cosine schedule, so one
run fits a fixed slot on the GPU machine. Outputs are Hugging Face folders (config.json,
model.safetensors in float16, tokenizer files, generation_config.json) that
`AutoModelForCausalLM.from_pretrained` loads offline.

    python scripts/train_reference_models.py --data ../shared/data/wikipedia-en --out quantkit/bundled
    python scripts/train_reference_models.py --smoke --out /tmp/qk-smoke      # CPU, seconds
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

HELDOUT_PART = "wiki_part03.jsonl.gz"
HELDOUT_COUNT = 150
SPECIAL_TOKENS = ["<|endoftext|>", "<|pad|>"]


@dataclass
class ModelShape:
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int


TARGET = ModelShape(256, 768, 8, 4, 2)
DRAFT = ModelShape(128, 384, 3, 2, 1)
SMOKE_TARGET = ModelShape(64, 128, 2, 2, 1)
SMOKE_DRAFT = ModelShape(32, 64, 1, 1, 1)


def read_articles(data_dir: Path) -> tuple[list[str], list[str]]:
    """Training texts and held-out texts, in a fixed order."""
    train, heldout = [], []
    for part in sorted(data_dir.glob("wiki_part*.jsonl.gz")):
        with gzip.open(part, "rt", encoding="utf-8") as f:
            texts = [json.loads(line)["text"] for line in f if line.strip()]
        if part.name == HELDOUT_PART:
            train += texts[:-HELDOUT_COUNT]
            heldout += texts[-HELDOUT_COUNT:]
        else:
            train += texts
    if not train:
        raise SystemExit(f"no wiki_part*.jsonl.gz files under {data_dir}")
    return train, heldout


def train_tokenizer(texts: list[str], vocab_size: int, out_dir: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        min_frequency=2,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        pad_token="<|pad|>",
        model_max_length=1024,
    )
    fast.save_pretrained(out_dir)
    return fast


def encode_corpus(tokenizer, texts: list[str]) -> torch.Tensor:
    """All documents as one token stream, each followed by the end-of-text token."""
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    batch = 256
    for i in range(0, len(texts), batch):
        for seq in tokenizer(texts[i : i + batch], add_special_tokens=False)["input_ids"]:
            ids.extend(seq)
            ids.append(eos)
    return torch.tensor(ids, dtype=torch.int32)


def build_model(shape: ModelShape, tokenizer, context: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.num_hidden_layers,
        num_attention_heads=shape.num_attention_heads,
        num_key_value_heads=shape.num_key_value_heads,
        max_position_embeddings=context,
        rope_theta=10000.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        attn_implementation="sdpa",
    )
    return LlamaForCausalLM(config)


def lr_at(progress: float, peak: float, warmup: float = 0.03, floor: float = 0.1) -> float:
    """Warm-up then cosine decay, driven by the fraction of the time budget spent."""
    if progress < warmup:
        return peak * progress / warmup
    t = min(1.0, (progress - warmup) / (1 - warmup))
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t)))


def train(model, tokens: torch.Tensor, *, seconds: float, batch: int, context: int, lr: float,
          device: str, seed: int, log, max_steps: int | None = None) -> dict:
    """Train until the time budget (or ``max_steps``, when given) is spent."""
    torch.manual_seed(seed)
    model.to(device).train()
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=lr, betas=(0.9, 0.95), eps=1e-8, fused=device.startswith("cuda"),
    )
    gen = torch.Generator().manual_seed(seed)
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if device.startswith("cuda") else _null()
    n_windows = len(tokens) - context - 1
    start, step, seen, loss_ema = time.perf_counter(), 0, 0, None
    while True:
        elapsed = time.perf_counter() - start
        progress = step / max_steps if max_steps else elapsed / seconds
        if progress >= 1.0:
            break
        for group in opt.param_groups:
            group["lr"] = lr_at(progress, lr)
        starts = torch.randint(0, n_windows, (batch,), generator=gen)
        idx = starts[:, None] + torch.arange(context + 1)[None, :]
        chunk = tokens[idx].long().to(device, non_blocking=True)
        with amp:
            logits = model(input_ids=chunk[:, :-1]).logits
        loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), chunk[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        seen += batch * context
        if step % 100 == 0 or step == 1:
            value = loss.item()
            loss_ema = value if loss_ema is None else 0.9 * loss_ema + 0.1 * value
            log(f"step {step:6d}  {elapsed:7.1f}s  loss {value:.4f}  tokens {seen/1e6:8.1f}M  "
                f"{seen / max(elapsed, 1e-9) / 1e3:8.1f}k tok/s")
    model.eval()
    return {"steps": step, "tokens": seen, "seconds": time.perf_counter() - start,
            "final_loss_ema": loss_ema}


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


@torch.no_grad()
def window_perplexity(model, ids: torch.Tensor, seq_len: int, device: str, batch: int = 16) -> float:
    """exp(mean NLL) over non-overlapping windows: the same protocol as `quantkit eval`."""
    n = len(ids) // seq_len
    windows = ids[: n * seq_len].long().view(n, seq_len)
    nll_sum = 0.0
    for i in range(0, n, batch):
        chunk = windows[i : i + batch].to(device)
        logits = model(input_ids=chunk).logits.float()
        nll = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), chunk[:, 1:].reshape(-1),
                              reduction="none").view(chunk.shape[0], -1).mean(dim=1)
        nll_sum += nll.sum().item()
    return math.exp(nll_sum / n)


def unigram_perplexity(train_tokens: torch.Tensor, eval_ids: torch.Tensor, vocab: int) -> float:
    """Perplexity of an add-one-smoothed unigram model fitted on the training stream."""
    counts = torch.bincount(train_tokens.long(), minlength=vocab).double() + 1.0
    logp = (counts / counts.sum()).log()
    return math.exp(-logp[eval_ids.long()].mean().item())


def wikitext2_test(path: Path) -> str:
    """The WikiText-2 test rows joined by blank lines, as `quantkit eval` reads them.

    Each line of the raw file is one dataset row without its trailing newline; a lone space
    stands for an empty row (calibration_data/README.md)."""
    lines = path.read_text(encoding="utf-8").split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return "\n\n".join("" if line == " " else line + "\n" for line in lines)


def save_model(model, tokenizer, out_dir: Path) -> None:
    from transformers import GenerationConfig

    out_dir.mkdir(parents=True, exist_ok=True)
    model.to("cpu", dtype=torch.float16)
    model.config.dtype = "float16"
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    GenerationConfig(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                     pad_token_id=tokenizer.pad_token_id, do_sample=False,
                     max_new_tokens=128).save_pretrained(out_dir)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared/data/wikipedia-en")
    ap.add_argument("--wikitext", type=Path,
                    default=Path(__file__).resolve().parents[1] / "calibration_data/wikitext2/wiki.test.raw")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--target-seconds", type=float, default=330.0)
    ap.add_argument("--draft-seconds", type=float, default=120.0)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--tokenizer-chars", type=int, default=40_000_000,
                    help="characters of training text used to fit the tokenizer")
    ap.add_argument("--max-steps", type=int, default=None,
                    help="train each model for this many steps instead of a time budget")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--smoke", action="store_true", help="tiny shapes, tiny data, seconds on a CPU")
    args = ap.parse_args()

    device = "cuda" if torch.cuda.is_available() else "cpu"
    target_shape, draft_shape = TARGET, DRAFT
    if args.smoke:
        target_shape, draft_shape = SMOKE_TARGET, SMOKE_DRAFT
        args.target_seconds, args.draft_seconds = min(args.target_seconds, 8), min(args.draft_seconds, 4)
        args.batch, args.context, args.vocab = 4, 64, 512
        args.tokenizer_chars = 300_000
    args.out.mkdir(parents=True, exist_ok=True)
    log_file = (args.out / "train_log.txt").open("w")

    def log(msg: str) -> None:
        print(msg, flush=True)
        log_file.write(msg + "\n")
        log_file.flush()

    t0 = time.perf_counter()
    train_texts, heldout_texts = read_articles(args.data)
    if args.smoke:
        train_texts, heldout_texts = train_texts[:40], heldout_texts[:5]
    if not args.wikitext.is_file():
        raise SystemExit(f"WikiText-2 test file not found: {args.wikitext}")
    log(f"{len(train_texts)} training articles, {len(heldout_texts)} held out; device {device}")

    fit_texts, n_chars = [], 0
    for text in train_texts:
        if n_chars >= args.tokenizer_chars:
            break
        fit_texts.append(text)
        n_chars += len(text)
    tok_dir = args.out / "_tokenizer"
    tokenizer = train_tokenizer(fit_texts, args.vocab, tok_dir)
    tokens = encode_corpus(tokenizer, train_texts)
    log(f"tokenizer: vocab {len(tokenizer)}; corpus {len(tokens)/1e6:.2f}M tokens "
        f"({sum(map(len, train_texts))/len(tokens):.2f} chars/token); {time.perf_counter()-t0:.0f}s")

    wikitext = wikitext2_test(args.wikitext)
    if args.smoke:
        wikitext = wikitext[:50_000]
    wt_ids = torch.tensor(tokenizer(wikitext, add_special_tokens=False)["input_ids"])
    ho_ids = torch.tensor(tokenizer("\n\n".join(heldout_texts), add_special_tokens=False)["input_ids"])
    eval_len = min(512, args.context)
    metrics = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
               "corpus_tokens": len(tokens), "vocab": len(tokenizer), "eval_seq_len": eval_len,
               "unigram_wikitext2_ppl": unigram_perplexity(tokens, wt_ids, len(tokenizer))}
    log(f"unigram WikiText-2 ppl {metrics['unigram_wikitext2_ppl']:.1f}")

    for name, shape, seconds, lr in (("target", target_shape, args.target_seconds, 2e-3),
                                     ("draft", draft_shape, args.draft_seconds, 3e-3)):
        model = build_model(shape, tokenizer, args.context)
        n_params = sum(p.numel() for p in model.parameters())
        log(f"== {name}: {n_params/1e6:.2f}M parameters, {asdict(shape)}")
        stats = train(model, tokens, seconds=seconds, batch=args.batch, context=args.context, lr=lr,
                      device=device, seed=args.seed, log=log, max_steps=args.max_steps)
        stats.update(parameters=n_params, shape=asdict(shape),
                     wikitext2_ppl=window_perplexity(model, wt_ids, eval_len, device),
                     heldout_ppl=window_perplexity(model, ho_ids, eval_len, device) if len(ho_ids) >= eval_len else None)
        log(f"{name}: WikiText-2 ppl {stats['wikitext2_ppl']:.2f}, held-out Wikipedia ppl "
            f"{stats['heldout_ppl']} (seq {eval_len}, {device}, trained in bf16 autocast)")
        save_model(model, tokenizer, args.out / name)
        metrics[name] = stats
        del model
        if device == "cuda":
            torch.cuda.empty_cache()

    (args.out / "train_metrics.json").write_text(json.dumps(metrics, indent=2))
    log(f"done in {time.perf_counter()-t0:.0f}s")


if __name__ == "__main__":
    main()
