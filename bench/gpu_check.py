"""One short run on a CUDA machine: exactness on the GPU, and engine speed with realistic shapes.

    python bench/gpu_check.py            # on a GPU machine (random weights, nothing downloaded)
    python bench/gpu_check.py --smoke    # tiny shapes, any device: checks the script itself

Random weights make acceptance meaningless, so speed is given as what each forward costs through
our runner (from which BiLD's speed at any acceptance rate follows) and as large-mode throughput of
the engine against transformers' generate.
"""

from __future__ import annotations

import argparse
import time

import torch
from offline import generate  # bench/offline.py, beside this script
from transformers import LlamaConfig, LlamaForCausalLM

from scheduler.model_runner import CausalLMRunner, ForwardItem
from scheduler.request import Mode, SamplingParams
from scheduler.scheduler import Scheduler, SchedulerConfig


def llama(hidden, layers, heads, kv, inter, vocab, init=0.02, seed=0, device="cuda", dtype=torch.float32):
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        max_position_embeddings=4096,
        initializer_range=init,
        tie_word_embeddings=False,
        eos_token_id=2,
        pad_token_id=2,
    )
    with torch.device(device):
        model = LlamaForCausalLM(cfg)
    return model.to(dtype).eval()


def run(scheduler, prompts, params):
    outputs, _, seconds = generate(scheduler, prompts, params)
    return outputs, seconds


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def exactness(device, dtype):
    large = llama(64, 2, 4, 2, 128, 512, init=0.5, seed=1, device=device, dtype=dtype)
    small = llama(64, 2, 4, 2, 128, 512, init=0.5, seed=1, device=device, dtype=dtype)
    with torch.no_grad():  # a noisy copy: agrees often, not always
        for p in small.parameters():
            p.add_(torch.randn_like(p) * 0.02 * p.float().std().to(p.dtype))
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 512, (n,), generator=gen).tolist() for n in (3, 17, 5, 40, 9, 1, 26, 12)]
    refs = []
    for p in prompts:
        with torch.no_grad():
            g = large.generate(
                torch.tensor([p], device=device), max_new_tokens=40, do_sample=False, eos_token_id=2, pad_token_id=2
            )
        refs.append(g[0, len(p) :].tolist())
    sched = Scheduler(
        CausalLMRunner(small, 8, 256),
        CausalLMRunner(large, 8, 256),
        SchedulerConfig(max_num_seqs=8, max_num_tokens=2048, max_seq_len=256),
        {2},
    )
    outs, _ = run(sched, prompts, SamplingParams(mode=Mode.EXACT, max_new_tokens=40, fallback_threshold=0.2))
    same = sum(o == r for o, r in zip(outs, refs))
    tokens = sum(a == b for o, r in zip(outs, refs) for a, b in zip(o, r)) / sum(map(len, refs))
    print(f"exact mode vs generate on {device} {dtype}: {same}/8 sequences identical, {tokens:.1%} of tokens")


def sampling_check(device, dtype):
    """Seeded sampling on the device: the same request alone and inside a busy batch gives the same tokens."""
    large = llama(64, 2, 4, 2, 128, 512, init=0.5, seed=1, device=device, dtype=dtype)
    small = llama(64, 2, 4, 2, 128, 512, init=0.5, seed=1, device=device, dtype=dtype)
    with torch.no_grad():
        for p in small.parameters():
            p.add_(torch.randn_like(p) * 0.02 * p.float().std().to(p.dtype))

    def sched(slots):
        return Scheduler(
            CausalLMRunner(small, slots, 256),
            CausalLMRunner(large, slots, 256),
            SchedulerConfig(max_num_seqs=slots, max_num_tokens=4096, max_seq_len=256),
            {2},
        )

    same = 0
    for mode in (Mode.EXACT, Mode.BILD, Mode.LARGE, Mode.SMALL):
        p = SamplingParams(
            mode=mode,
            max_new_tokens=40,
            temperature=0.9,
            top_p=0.95,
            seed=7,
            fallback_threshold=0.1,
            logprobs=True,
            top_logprobs=2,
            batch_independent=True,
        )
        alone, _ = run(sched(1), [[5, 6, 7]], p)
        others = [SamplingParams(mode=Mode.EXACT, max_new_tokens=30, temperature=1.0, seed=s) for s in range(7)]
        busy, _ = run(sched(8), [[9, 9, i] for i in range(7)] + [[5, 6, 7]], [*others, p])
        same += busy[-1] == alone[0]
    print(f"seeded sampling on {device} {dtype}: {same}/4 modes reproduce alone vs in a busy batch")


def forward_costs(device, dtype, large, small, batches, ctx=256):
    print("\n| model | batch | new tokens per sequence | ms per forward |\n|---|---|---|---|")
    for name, model in (("large", large), ("small", small)):
        for b in batches:
            runner = CausalLMRunner(model, b, ctx + 64)
            runner.next_token_logits([ForwardItem(i, 0, [5] * ctx) for i in range(b)])
            for q in (1, 4, 11) if name == "large" else (1,):
                items = [ForwardItem(i, ctx, [7] * q) for i in range(b)]
                for _ in range(3):
                    runner.token_logits(items)
                sync(device)
                t = time.perf_counter()
                n = 10
                for _ in range(n):
                    runner.token_logits(items)
                sync(device)
                print(f"| {name} | {b} | {q} | {(time.perf_counter() - t) / n * 1e3:.2f} |", flush=True)


def throughput(device, large, batches, max_new):
    gen = torch.Generator().manual_seed(0)
    print("\n| system | batch | tokens/s |\n|---|---|---|")
    prompt = torch.randint(3, large.config.vocab_size, (64,), generator=gen).tolist()
    with torch.no_grad():
        large.generate(torch.tensor([prompt], device=device), max_new_tokens=4, min_new_tokens=4, do_sample=False)
        sync(device)
        t = time.perf_counter()
        large.generate(
            torch.tensor([prompt], device=device), max_new_tokens=max_new, min_new_tokens=max_new, do_sample=False
        )
        sync(device)
    print(f"| transformers generate | 1 | {max_new / (time.perf_counter() - t):.1f} |", flush=True)
    for b in batches:
        prompts = [torch.randint(3, large.config.vocab_size, (64,), generator=gen).tolist() for _ in range(b)]
        sched = Scheduler(
            None,
            CausalLMRunner(large, b, 64 + max_new + 1),
            SchedulerConfig(max_num_seqs=b, max_num_tokens=b * 1024, max_seq_len=64 + max_new + 1),
            set(),
        )
        run(sched, prompts, SamplingParams(mode=Mode.LARGE, max_new_tokens=4))
        outs, secs = run(sched, prompts, SamplingParams(mode=Mode.LARGE, max_new_tokens=max_new))
        print(f"| bild engine, mode large | {b} | {sum(map(len, outs)) / secs:.1f} |", flush=True)


def bigram_pair(large, small, disagree: float, seed: int = 0):
    """Give a random-weight pair controlled agreement while keeping every layer's full cost.

    Both models' layers stop writing to the residual stream (o_proj, down_proj = 0), so each model
    becomes a bigram table from its embedding and output head; the tables agree on all but a
    `disagree` share of tokens. The layers still run at full size, so timings are realistic.
    """
    gen = torch.Generator().manual_seed(seed)
    vocab = large.config.vocab_size
    table = torch.randint(3, vocab, (vocab,), generator=gen)
    large_table = table.clone()
    flip = torch.rand(vocab, generator=gen) < disagree
    large_table[flip] = torch.randint(3, vocab, (int(flip.sum()),), generator=gen)
    for model, tab in ((large, large_table), (small, table)):
        hidden = model.config.hidden_size
        with torch.no_grad():
            for layer in model.model.layers:
                layer.self_attn.o_proj.weight.zero_()
                layer.mlp.down_proj.weight.zero_()
            emb = torch.randn(vocab, hidden, generator=gen)
            emb = emb / emb.norm(dim=-1, keepdim=True)
            # The final RMSNorm scales a unit vector to norm sqrt(hidden): the right token scores ~12.
            head = torch.zeros(vocab, hidden).index_add_(0, tab, emb) * (12 / hidden**0.5)
            model.model.embed_tokens.weight.copy_(emb.to(model.dtype))
            model.lm_head.weight.copy_(head.to(model.dtype))


def bild_speed(device, large, small, batches, max_new, disagree):
    bigram_pair(large, small, disagree)
    gen = torch.Generator().manual_seed(1)
    print("\n| batch | mode | tokens/s | speed-up vs large | tokens from the small model |\n|---|---|---|---|---|")
    for b in batches:
        prompts = [torch.randint(3, large.config.vocab_size, (16,), generator=gen).tolist() for _ in range(b)]
        max_len = 16 + max_new + 1
        sched = Scheduler(
            CausalLMRunner(small, b, max_len),
            CausalLMRunner(large, b, max_len),
            SchedulerConfig(max_num_seqs=b, max_num_tokens=b * max_len, max_seq_len=max_len),
            set(),
        )
        run(sched, prompts, SamplingParams(mode=Mode.EXACT, max_new_tokens=8))
        base = None
        for mode in (Mode.LARGE, Mode.EXACT, Mode.BILD):
            outputs, reqs, seconds = generate(sched, prompts, SamplingParams(mode=mode, max_new_tokens=max_new))
            tokens = sum(map(len, outputs))
            rate = tokens / seconds
            base = base or rate
            share = sum(r.stats.small_tokens for r in reqs) / max(1, tokens)
            print(f"| {b} | {mode.value} | {rate:.1f} | {rate / base:.2f}x | {share:.0%} |", flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--disagree", type=float, default=0.2)
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(
        f"device: {torch.cuda.get_device_name() if device == 'cuda' else 'cpu'}, torch {torch.__version__}, "
        f"transformers {__import__('transformers').__version__}"
    )
    torch.backends.cuda.matmul.allow_tf32 = False
    exactness(device, torch.float32)
    if device == "cuda":
        exactness(device, torch.bfloat16)
    sampling_check(device, torch.float32)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    if args.smoke:
        large = llama(128, 2, 4, 2, 256, 1000, device=device, dtype=dtype)
        small = llama(64, 1, 4, 2, 128, 1000, device=device, dtype=dtype)
        batches, max_new = [1, 2], 8
    else:  # TinyLlama-1.1B-like large, ~60M small
        large = llama(2048, 22, 32, 4, 5632, 32000, device=device, dtype=dtype)
        small = llama(512, 6, 8, 2, 1536, 32000, device=device, dtype=dtype, seed=1)
        batches, max_new = [1, 8, 32], 64
    print(
        f"\nlarge {sum(p.numel() for p in large.parameters()) / 1e6:.0f}M, "
        f"small {sum(p.numel() for p in small.parameters()) / 1e6:.0f}M parameters, {dtype}"
    )
    forward_costs(device, dtype, large, small, batches)
    throughput(device, large, batches, max_new)
    print(f"\nBiLD with a pair whose tables disagree on {args.disagree:.0%} of tokens (bigram_pair):")
    bild_speed(device, large, small, batches, max_new, args.disagree)


if __name__ == "__main__":
    main()
