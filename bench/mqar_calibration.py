"""How many steps a small Qwen3 needs to form content lookup, and what slows it (issue 22, docs/FINDINGS.md).

Multi-query associative recall in token space (Zoology's MQAR, arXiv 2312.04927) in the plainest loop: a fresh
transformers Qwen3, rows of `--pairs` one-token key-value pairs then queries "key value" of those keys to the end of
the row, cross-entropy on the queried values only, AdamW with a linear warm-up then a constant lr. Every 100 steps
it scores 256 held-out rows (the share of queried values that are the argmax) and stops once that passes 97 %. Each
flag is one factor the retrieval probe (`bench/retrieval_probe.py`, the GPU teacher's shape and settings) differs in,
so that a factor's cost is measured by changing it alone. Runs on a CPU in minutes:

    python bench/mqar_calibration.py --out mqar.json                       # 8 pairs, width 64, 256 keys
    python bench/mqar_calibration.py --keys 1024 --out mqar_keys.json      # one factor changed

Prints the curve and writes it as JSON (command, versions, commit, date) with the steps at which 50 % and 90 % were
first reached.
"""
from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, write_result  # noqa: E402
from retrieval_probe import mqar_rows  # noqa: E402


def rows(rng: random.Random, n: int, length: int, pairs: int, keys: range, values: range):
    """(ids [n, length], mask [n, length]: True at each queried value), values drawn with replacement (the probe's
    drills draw them without: `retrieval_probe.mqar_rows`, which makes both)."""
    ids, mask = zip(*mqar_rows(rng, n, length, pairs, keys, values, distinct_values=False))
    return torch.tensor(ids), torch.tensor(mask)


def qk_eps(args, final: float, step: int) -> float:
    """The q/k norms' epsilon at `step`: --qk-norm-eps, geometrically down to `final` over --qk-eps-anneal steps."""
    return args.qk_norm_eps * (final / args.qk_norm_eps) ** min(1.0, step / args.qk_eps_anneal)


def set_qk_eps(model, eps: float) -> None:
    for layer in model.model.layers:
        for norm in (layer.self_attn.q_norm, layer.self_attn.k_norm):
            if hasattr(norm, "variance_epsilon"):
                norm.variance_epsilon = eps


def answer_accuracy(model, ids, mask) -> float:
    ids, mask = ids.to(model.device), mask.to(model.device)
    with torch.no_grad():
        predicted = model(ids).logits[:, :-1].argmax(-1)
    return (predicted[mask[:, 1:]] == ids[:, 1:][mask[:, 1:]]).float().mean().item()


def make_model(args) -> torch.nn.Module:
    """A fresh Qwen3 (the teachers' architecture), or with `--arch gpt2` a GPT-2 of the same width, depth and heads
    (learned positions, LayerNorm, GELU MLP, no q/k norms: whether an effect is Qwen3's or any transformer's)."""
    from transformers import GPT2Config, GPT2LMHeadModel, Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(args.seed)
    vocab = args.vocab or 2 * args.keys + 8
    if args.arch == "gpt2":
        config = GPT2Config(vocab_size=vocab, n_embd=args.hidden, n_layer=args.layers, n_head=args.heads,
                            n_inner=args.mlp * args.hidden, n_positions=args.seq_len, initializer_range=args.init_std,
                            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=True)
        model = GPT2LMHeadModel(config)
        writes = [(block.attn.c_proj, block.mlp.c_proj) for block in model.transformer.h]
    else:
        config = Qwen3Config(vocab_size=vocab, hidden_size=args.hidden, intermediate_size=args.mlp * args.hidden,
                             num_hidden_layers=args.layers, num_attention_heads=args.heads,
                             num_key_value_heads=min(args.kv_heads, args.heads), head_dim=args.hidden // args.heads,
                             max_position_embeddings=args.seq_len, tie_word_embeddings=True,
                             initializer_range=args.init_std)
        model = Qwen3ForCausalLM(config)
        writes = [(layer.self_attn.o_proj, layer.mlp.down_proj) for layer in model.model.layers]
        for layer in model.model.layers:  # Qwen3 RMS-normalises each head's q and k: |logit| <= sqrt(head_dim) x gains
            for which in ("q", "k"):
                if which in args.qk_norm:
                    torch.nn.init.constant_(getattr(layer.self_attn, f"{which}_norm").weight, args.qk_norm_init)
                else:
                    setattr(layer.self_attn, f"{which}_norm", torch.nn.Identity())
            if args.qk_init_std is not None:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj):
                    torch.nn.init.normal_(proj.weight, 0.0, args.qk_init_std)
        if args.qk_norm_eps is not None:
            set_qk_eps(model, args.qk_norm_eps)
    with torch.no_grad():
        for pair in writes:
            for proj in pair:
                if args.zero_writes:
                    proj.weight.zero_()
                elif args.residual_init:
                    proj.weight.mul_((2 * args.layers) ** -0.5)
        if args.embed_std is not None:
            model.get_input_embeddings().weight.normal_(0.0, args.embed_std)
    return model


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pairs", type=int, default=8)
    p.add_argument("--keys", type=int, default=256, help="distinct key ids (as many value ids)")
    p.add_argument("--vocab", type=int, help="vocabulary size (default: just the keys and values, + 8)")
    p.add_argument("--arch", choices=["qwen3", "gpt2"], default="qwen3")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--hidden", type=int, default=64, help="width")
    p.add_argument("--heads", type=int, default=4, help="attention heads, each of hidden/heads")
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--mlp", type=int, default=4, help="MLP width as a multiple of the hidden size")
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--beta2", type=float, default=0.98)
    p.add_argument("--no-decay-norms", action="store_true",
                   help="no weight decay on norm gains and biases, as gendistill's trainer (default: on every weight)")
    p.add_argument("--residual-init", action="store_true",
                   help="scale the init of the layers' writes to the residual stream (o_proj, down_proj) by "
                        "1/sqrt(2 x layers), as GPT-2 and nanoGPT do; transformers' Qwen3 init does not (its GPT-2 "
                        "does: with --arch gpt2 this scales them twice)")
    p.add_argument("--zero-writes", action="store_true",
                   help="initialise the layers' writes to the residual stream (o_proj, down_proj) at zero, as nanochat "
                        "and modded-nanogpt do: every block starts as the identity, so at any depth the residual "
                        "stream starts as the token embedding")
    p.add_argument("--qk-norm", choices=["qk", "q", "k", "none"], default="qk",
                   help="which of Qwen3's per-head RMSNorms of the queries and keys to keep (default both, as Qwen3)")
    p.add_argument("--qk-norm-init", type=float, default=1.0,
                   help="initial gain of Qwen3's q/k norms (1: transformers' init; the bound on an attention logit, "
                        "sqrt(head_dim) x gain^2 at init, grows with its square)")
    p.add_argument("--qk-norm-eps", type=float,
                   help="the q/k norms' epsilon (Qwen3: rms_norm_eps, 1e-6): far above the mean square of q and k "
                        "(~0.03 at init) a norm is nearly linear, x g/sqrt(eps), as if absent")
    p.add_argument("--qk-eps-anneal", type=int, default=0,
                   help="with --qk-norm-eps: take the epsilon geometrically down to the model's rms_norm_eps over this "
                        "many steps (0: keep it), so that the trained model is a plain Qwen3")
    p.add_argument("--qk-init-std", type=float,
                   help="std of q_proj's and k_proj's init instead of --init-std: behind Qwen3's q/k norms their scale "
                        "does not change the forward, only how far an Adam step of size lr turns them")
    p.add_argument("--embed-std", type=float,
                   help="std of the (tied) embedding's init instead of --init-std")
    p.add_argument("--init-std", type=float, default=0.02,
                   help="std of the normal init of every weight matrix (Qwen3's initializer_range, 0.02 at any width)")
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--seed", type=int, default=0, help="of the model's init and the training rows")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu", help="cpu or cuda (fp32 either way; TF32 matmuls on a GPU)")
    p.add_argument("--budget-s", type=float, help="stop at the first evaluation after this many seconds")
    p.add_argument("--out", required=True)
    return p


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    keys, values = range(4, 4 + args.keys), range(4 + args.keys, 4 + 2 * args.keys)
    torch.backends.cuda.matmul.allow_tf32 = True
    model = make_model(args).to(args.device)
    if args.no_decay_norms:  # as gendistill's trainer: norms and biases excluded from weight decay
        from gendistill.modeling import no_weight_decay

        named = list(model.named_parameters())
        groups = [{"params": [p for n, p in named if not no_weight_decay(n)]},
                  {"params": [p for n, p in named if no_weight_decay(n)], "weight_decay": 0.0}]
    else:
        groups = model.parameters()
    opt = torch.optim.AdamW(groups, lr=args.lr, weight_decay=args.weight_decay, betas=(0.9, args.beta2))
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / args.warmup))
    train, held_rng = random.Random(args.seed), random.Random(123)  # the same held-out rows for every seed
    held = rows(held_rng, 256, args.seq_len, args.pairs, keys, values)
    curve, first, t0 = [], {"0.5": None, "0.9": None}, time.time()
    for step in range(1, args.steps + 1):
        ids, mask = (t.to(args.device) for t in rows(train, args.batch, args.seq_len, args.pairs, keys, values))
        if args.qk_norm_eps is not None and args.qk_eps_anneal:
            set_qk_eps(model, qk_eps(args, model.config.rms_norm_eps, step))
        m = mask[:, 1:]
        loss = F.cross_entropy(model(ids).logits[:, :-1][m], ids[:, 1:][m])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        schedule.step()
        opt.zero_grad()
        if step % 100 == 0:
            acc = answer_accuracy(model, *held)
            curve.append({"step": step, "loss": round(loss.item(), 4), "heldout": round(acc, 4)}
                         | ({"qk_eps": qk_eps(args, model.config.rms_norm_eps, step)} if args.qk_eps_anneal else {}))
            for threshold in first:
                if first[threshold] is None and acc >= float(threshold):
                    first[threshold] = step
            print(f"step {step:>5}  loss {loss.item():.3f}  held-out {acc:.3f}  {time.time() - t0:.0f}s", flush=True)
            if (acc > 0.97 and step >= args.qk_eps_anneal) or (args.budget_s and time.time() - t0 > args.budget_s):
                break
    print(f"first step at 50 % / 90 %: {first['0.5']} / {first['0.9']}")
    write_result(args.out, {"config": vars(args) | {"vocab": model.config.vocab_size}, "curve": curve,
                            "first_step_at": first, "chance": 1 / args.pairs, "wall_s": round(time.time() - t0, 1),
                            **environment()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
