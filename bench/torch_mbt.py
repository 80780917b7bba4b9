#!/usr/bin/env python3
"""PyTorch eager reference of `mbtd bench train` (the MBT-LM benchmark preset).

Same model as ARCHITECTURE.md "The model: MBT-LM v1": token + position embeddings,
L layers of K pre-LN GPT blocks mixed by floor-softmax weights (masked branches are
not computed, the others renormalised), final LayerNorm, untied head, mean
cross-entropy, AdamW (β 0.9/0.95, eps 1e-8, weight decay on matrices only), global
norm clipping, random tokens. Prints one JSON line like `mbtd bench train`.
`--bf16` runs forward and loss under `torch.autocast("cpu", dtype=torch.bfloat16)`
(bf16 matrix products, fp32 weights and optimizer), the counterpart of
`mbtd bench train --precision bf16`.

    python3 bench/torch_mbt.py [--threads 2] [--p-active 0.75] [--steps 10] [--bf16]

Needs PyTorch 2.x (CPU). Not part of the test suite.
"""

import argparse
import json
import math
import time

import torch
import torch.nn as nn
import torch.nn.functional as F


class Block(nn.Module):
    """u = h + Wo·Attn(LN1(h)); z = u + W2·gelu_tanh(W1·LN2(u) + b1) + b2."""

    def __init__(self, d, heads, n_layers):
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(d, eps=1e-5)
        self.qkv = nn.Linear(d, 3 * d)
        self.out = nn.Linear(d, d)
        self.ln2 = nn.LayerNorm(d, eps=1e-5)
        self.fc = nn.Linear(d, 4 * d)
        self.proj = nn.Linear(4 * d, d)
        for lin, std in ((self.qkv, 0.02), (self.fc, 0.02),
                         (self.out, 0.02 / math.sqrt(2 * n_layers)),
                         (self.proj, 0.02 / math.sqrt(2 * n_layers))):
            nn.init.normal_(lin.weight, 0.0, std)
            nn.init.zeros_(lin.bias)

    def forward(self, h):
        b, t, d = h.shape
        q, k, v = self.qkv(self.ln1(h)).split(d, dim=2)
        q, k, v = (x.view(b, t, self.heads, d // self.heads).transpose(1, 2) for x in (q, k, v))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        u = h + self.out(a.transpose(1, 2).reshape(b, t, d))
        return u + self.proj(F.gelu(self.fc(self.ln2(u)), approximate="tanh"))


class Mbt(nn.Module):
    def __init__(self, v, d, heads, n_layers, k, t_max, floor):
        super().__init__()
        self.floor = floor
        self.wte = nn.Parameter(torch.randn(v, d) * 0.02)
        self.wpe = nn.Parameter(torch.randn(t_max, d) * 0.02)
        self.layers = nn.ModuleList(
            nn.ModuleList(Block(d, heads, n_layers) for _ in range(k)) for _ in range(n_layers))
        self.alpha_logits = nn.ParameterList(nn.Parameter(torch.zeros(k)) for _ in range(n_layers))
        self.lnf = nn.LayerNorm(d, eps=1e-5)
        self.head = nn.Linear(d, v, bias=False)
        nn.init.normal_(self.head.weight, 0.0, 0.02)

    def forward(self, ids, masks):
        h = self.wte[ids] + self.wpe[: ids.shape[1]]
        for branches, s, m in zip(self.layers, self.alpha_logits, masks):
            k = len(branches)
            alpha = self.floor / k + (1 - self.floor) * torch.softmax(s, 0)
            alpha = alpha * m
            alpha = alpha / alpha.sum()
            h = sum(alpha[i] * br(h) for i, br in enumerate(branches) if m[i] > 0)
        return self.head(self.lnf(h))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--p-active", type=float, default=1.0)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--bf16", action="store_true",
                    help="autocast forward and loss to bfloat16 (fp32 master weights)")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(1)
    v, d, heads, n_layers, k = 4096, 256, 4, 4, 4
    model = Mbt(v, d, heads, n_layers, k, 128, 0.2)
    decay = [p for n, p in model.named_parameters() if p.dim() == 2]
    rest = [p for n, p in model.named_parameters() if p.dim() != 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                             {"params": rest, "weight_decay": 0.0}],
                            lr=3e-4, betas=(0.9, 0.95), eps=1e-8)
    gen = torch.Generator().manual_seed(1)

    def step():
        ids = torch.randint(0, v, (a.batch, a.seq), generator=gen)
        tgt = torch.randint(0, v, (a.batch, a.seq), generator=gen)
        masks = []
        for _ in range(n_layers):
            m = (torch.rand(k, generator=gen) < a.p_active).float()
            if m.sum() == 0:
                m[torch.randint(0, k, (1,), generator=gen)] = 1.0
            masks.append(m)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=a.bf16):
            logits = model(ids, masks)
            loss = F.cross_entropy(logits.view(-1, v), tgt.view(-1))
        opt.zero_grad(set_to_none=False)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        return loss.item()

    for _ in range(a.warmup):
        step()
    times = []
    for _ in range(a.steps):
        t0 = time.perf_counter()
        loss = step()
        times.append(time.perf_counter() - t0)
    total = sum(times)
    print(json.dumps({
        "bench": "torch_train",
        "torch": torch.__version__,
        "threads": a.threads,
        "p_active": a.p_active,
        "precision": "bf16" if a.bf16 else "f32",
        "params": sum(p.numel() for p in model.parameters()),
        "step_ms_mean": total / len(times) * 1e3,
        "step_ms_p50": sorted(times)[len(times) // 2] * 1e3,
        "tokens_per_sec": a.batch * a.seq * len(times) / total,
        "final_loss": loss,
    }))


if __name__ == "__main__":
    main()
