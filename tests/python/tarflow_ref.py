"""Independent PyTorch TARFlow written from shared/docs/flowback-spec.md §1-§3 (not from the reference
code): the parity oracle of the Rust flow and the anchor of `pipeline bench flow`.

  tarflow_ref.py parity CONFIG.json WEIGHTS.safetensors INPUTS.safetensors OUT.safetensors
  tarflow_ref.py export CONFIG.json WEIGHTS.{safetensors,pth} INPUTS.safetensors OUT.safetensors
  tarflow_ref.py bench CONFIG.json --batch B --steps S --sample-batch SB --sample-repeats R --guidance W --threads T

The config is the Rust `model::tarflow::Config` as JSON. Guided sampling here runs the conditional and
unconditional branches as two separate passes with separate caches, as the reference does.
"""
import argparse
import json
import math
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file


class Norm(nn.LayerNorm):
    """LayerNorm in fp32 whatever the input precision."""

    def forward(self, x):
        return super().forward(x.float()).type(x.dtype)


def rope_tables(cfg):
    grid = cfg["img_size"] // cfg["patch_size"]
    half = cfg["head_dim"] // 2
    k = torch.arange(half // 2, dtype=torch.float64)
    freqs = 1.0 / cfg["rope_base"] ** (2 * k / half)
    n = torch.arange(grid * grid)
    rows, cols = (n // grid).double(), (n % grid).double()
    ang = torch.cat([rows[:, None] * freqs, cols[:, None] * freqs], dim=1)  # (N, head_dim/2)
    ang = ang.repeat_interleave(2, dim=1).float()
    return ang.cos(), ang.sin()


def rotate(t, cos, sin):
    pairs = t.unflatten(-1, (-1, 2))
    rot = torch.stack([-pairs[..., 1], pairs[..., 0]], dim=-1).flatten(-2)
    return t * cos + rot * sin


class Attention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        c = cfg["channels"]
        self.norm = Norm(c)
        self.qkv = nn.Linear(c, 3 * c)
        self.proj = nn.Linear(c, c)
        self.heads, self.hd = c // cfg["head_dim"], cfg["head_dim"]
        self.cache = None

    def forward(self, x, rope=None, start=0, temp=1.0, cached=False, mask=None):
        b, t, c = x.shape
        q, k, v = self.qkv(self.norm(x)).view(b, t, 3, self.heads, self.hd).permute(2, 0, 3, 1, 4)
        if rope is not None:
            cos, sin = rope[0][start:start + t], rope[1][start:start + t]
            q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        scale = self.hd ** -0.5 / temp
        if cached:
            if self.cache is None:
                self.cache = (k, v)
            else:
                self.cache = (torch.cat([self.cache[0], k], 2), torch.cat([self.cache[1], v], 2))
            k, v = self.cache
            out = F.scaled_dot_product_attention(q, k, v, scale=scale)
        else:
            # The boolean lower-triangular mask buffer, as spec §1.4 describes the reference.
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
        return self.proj(out.transpose(1, 2).reshape(b, t, c))


class Mlp(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        c = cfg["channels"]
        h = round(cfg["mlp_ratio"] * c)
        self.norm = Norm(c)
        self.kind = cfg["mlp"]
        if self.kind == "gelu":
            self.main = nn.Sequential(nn.Linear(c, h), nn.GELU(), nn.Linear(h, c))
        else:
            self.gate, self.up, self.down = nn.Linear(c, h), nn.Linear(c, h), nn.Linear(h, c)
            self.act = nn.SiLU() if cfg["swiglu_gate"] == "silu" else nn.GELU(approximate="tanh")

    def forward(self, x):
        x = self.norm(x)
        if self.kind == "gelu":
            return self.main(x)
        return self.down(self.act(self.gate(x)) * self.up(x))


class Layer(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.attention, self.mlp = Attention(cfg), Mlp(cfg)

    def forward(self, x, **kw):
        x = x + self.attention(x, **kw)
        return x + self.mlp(x)


class Block(nn.Module):
    def __init__(self, cfg, flip):
        super().__init__()
        n = (cfg["img_size"] // cfg["patch_size"]) ** 2
        d = cfg["in_channels"] * cfg["patch_size"] ** 2
        c = cfg["channels"]
        self.flip, self.d = flip, d
        self.proj_in = nn.Linear(d, c)
        self.pos_embed = nn.Parameter(torch.randn(n, c) * 0.01) if cfg["pos_embed"] else None
        k = cfg["num_classes"]
        self.class_embed = nn.Parameter(torch.randn(k, 1, c) * 0.01) if k > 0 else None
        self.attn_blocks = nn.ModuleList([Layer(cfg) for _ in range(cfg["layers_per_block"])])
        self.proj_out = nn.Linear(c, 2 * d)
        nn.init.zeros_(self.proj_out.weight)
        self.register_buffer("attn_mask", torch.tril(torch.ones(n, n, dtype=torch.bool)))
        self.rope = rope_tables(cfg) if cfg["rope"] else None

    def perm(self, x):
        return x.flip(1) if self.flip else x

    def class_emb(self, y, batch):
        if self.class_embed is None:
            return 0
        mean = self.class_embed.mean(0)  # (1, C)
        if y is None:
            return mean.expand(batch, 1, -1)
        emb = self.class_embed[y.clamp(min=0)]
        return torch.where((y < 0)[:, None, None], mean, emb)

    def embed(self, x, start, y):
        h = self.proj_in(x)
        if self.pos_embed is not None:
            h = h + self.perm(self.pos_embed[None])[:, start:start + x.shape[1]]
        return h + self.class_emb(y, x.shape[0])

    def forward(self, x, y):
        xp = self.perm(x)
        h = self.embed(xp, 0, y)
        for layer in self.attn_blocks:
            h = layer(h, rope=self.rope, mask=self.attn_mask)
        o = self.proj_out(h)
        o = torch.cat([torch.zeros_like(o[:, :1]), o[:, :-1]], 1)
        a, b = o[..., : self.d].float(), o[..., self.d:].float()
        z = (xp.float() - b) * torch.exp(-a)
        return self.perm(z.type(x.dtype)), -a.mean(dim=(1, 2))

    def step(self, tok, i, y, temp):
        h = self.embed(tok, i, y)
        for layer in self.attn_blocks:
            h = layer(h, rope=self.rope, start=i, temp=temp, cached=True)
        o = self.proj_out(h).float()
        return o[..., : self.d], o[..., self.d:]

    def clear(self):
        for layer in self.attn_blocks:
            layer.attention.cache = None

    @torch.no_grad()
    def reverse(self, z, y, w, annealed, temp):
        x = self.perm(z).clone()
        n = x.shape[1]
        # Conditional and unconditional branches each keep their own caches, as in the reference.
        caches = {}
        for i in range(n - 1):
            tok = x[:, i:i + 1]
            for branch in ("cond", "uncond") if w != 0 else ("cond",):
                for j, layer in enumerate(self.attn_blocks):
                    layer.attention.cache = caches.get((branch, j))
                out = self.step(tok, i, y if branch == "cond" else None, 1.0 if branch == "cond" else temp)
                for j, layer in enumerate(self.attn_blocks):
                    caches[(branch, j)] = layer.attention.cache
                if branch == "cond":
                    a, b = out
                else:
                    g = w * (i + 1) / (n - 1) if annealed else w
                    a = a + g * (a - out[0])
                    b = b + g * (b - out[1])
            x[:, i + 1:i + 2] = x[:, i + 1:i + 2] * torch.exp(a) + b
        self.clear()
        return self.perm(x)


    @torch.no_grad()
    def reverse_fast(self, z, y, w, annealed, temp):
        """The same inverse as `reverse`, written as a careful PyTorch user would for speed: the
        conditional and unconditional branches batched in one pass per token (the unconditional rows'
        queries pre-scaled by 1/temp), and the KV caches preallocated for the whole sequence."""
        x = self.perm(z).clone()
        bsz, n, _ = x.shape
        guided = w != 0
        rows = 2 * bsz if guided else bsz
        yy = y
        if guided and y is not None:
            yy = torch.cat([y, torch.full_like(y, -1)])
        first = self.attn_blocks[0].attention
        shape = (rows, first.heads, n, first.hd)
        caches = [
            (x.new_empty(shape), x.new_empty(shape)) for _ in self.attn_blocks
        ]
        qscale = x.new_ones(rows, 1, 1, 1)
        if guided:
            qscale[bsz:] = 1.0 / temp
        for i in range(n - 1):
            tok = x[:, i:i + 1]
            h = self.embed(torch.cat([tok, tok]) if guided else tok, i, yy)
            for layer, (kc, vc) in zip(self.attn_blocks, caches):
                att = layer.attention
                b_, t, c = h.shape
                q, k, v = att.qkv(att.norm(h)).view(b_, t, 3, att.heads, att.hd).permute(2, 0, 3, 1, 4)
                if self.rope is not None:
                    cos, sin = self.rope[0][i:i + 1], self.rope[1][i:i + 1]
                    q, k = rotate(q, cos, sin), rotate(k, cos, sin)
                kc[:, :, i:i + 1] = k
                vc[:, :, i:i + 1] = v
                out = F.scaled_dot_product_attention(
                    q * qscale, kc[:, :, :i + 1], vc[:, :, :i + 1], scale=att.hd ** -0.5
                )
                h = h + att.proj(out.transpose(1, 2).reshape(b_, t, c))
                h = h + layer.mlp(h)
            o = self.proj_out(h).float()
            a, b = o[..., : self.d], o[..., self.d:]
            if guided:
                g = w * (i + 1) / (n - 1) if annealed else w
                a = a[:bsz] + g * (a[:bsz] - a[bsz:])
                b = b[:bsz] + g * (b[:bsz] - b[bsz:])
            x[:, i + 1:i + 2] = x[:, i + 1:i + 2] * torch.exp(a) + b
        return self.perm(x)


class Flow(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.blocks = nn.ModuleList([Block(cfg, i % 2 == 1) for i in range(cfg["num_blocks"])])
        n = (cfg["img_size"] // cfg["patch_size"]) ** 2
        self.register_buffer("var", torch.ones(n, cfg["in_channels"] * cfg["patch_size"] ** 2))

    def patchify(self, x):
        return F.unfold(x, self.cfg["patch_size"], stride=self.cfg["patch_size"]).transpose(1, 2)

    def unpatchify(self, x):
        s, p = self.cfg["img_size"], self.cfg["patch_size"]
        return F.fold(x.transpose(1, 2), (s, s), p, stride=p)

    def forward(self, x, y):
        h = self.patchify(x)
        outputs, logdet = [], 0
        for block in self.blocks:
            h, ld = block(h, y)
            outputs.append(h)
            logdet = logdet + ld
        return h, outputs, logdet

    @torch.no_grad()
    def reverse(self, z, y, w=0.0, annealed=False, temp=1.0, fast=False):
        x = z * self.var.sqrt()
        for block in reversed(self.blocks):
            x = (block.reverse_fast if fast else block.reverse)(x, y, w, annealed, temp)
        return self.unpatchify(x)


def parity(args):
    cfg = json.load(open(args.config))
    model = Flow(cfg)
    model.load_state_dict(load_file(args.weights), strict=True)
    inp = load_file(args.inputs)
    x, y, noise = inp["x"], inp["y"], inp["noise"]
    g = inp["guidance"].tolist()  # [w, annealed, temp]
    with torch.no_grad():
        z, outputs, logdet = model(x, y)
        out = {"z": z, "logdet": logdet, "sample": model.reverse(noise, y, g[0], g[1] > 0.5, g[2])}
        out["sample_plain"] = model.reverse(noise, y)
        out["sample_fast"] = model.reverse(noise, y, g[0], g[1] > 0.5, g[2], fast=True)
    out.update({f"block{i}": o for i, o in enumerate(outputs)})
    save_file({k: v.contiguous() for k, v in out.items()}, args.out)


def export(args):
    """A stand-in for a public checkpoint: this module's own state_dict (safetensors, or a `.pth` written
    with torch.save as ml-tarflow's train.py writes it), plus z for x."""
    cfg = json.load(open(args.config))
    torch.manual_seed(0)
    model = Flow(cfg)
    for blk in model.blocks:
        nn.init.normal_(blk.proj_out.weight, std=0.01)
    if args.weights.endswith(".pth"):
        torch.save(model.state_dict(), args.weights)
    else:
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, args.weights)
    inp = load_file(args.inputs)
    with torch.no_grad():
        z, _, logdet = model(inp["x"], inp.get("y"))
    save_file({"z": z.contiguous(), "logdet": logdet}, args.out)


def bench(args):
    torch.set_num_threads(args.threads)
    cfg = json.load(open(args.config))
    torch.manual_seed(0)
    dev = torch.device(args.device)
    model = Flow(cfg)
    for blk in model.blocks:
        nn.init.normal_(blk.proj_out.weight, std=0.01)
    model.to(dev)
    for blk in model.blocks:
        if blk.rope is not None:
            blk.rope = (blk.rope[0].to(dev), blk.rope[1].to(dev))
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    autocast = lambda: torch.autocast("cuda", dtype=torch.bfloat16, enabled=args.bf16)
    # The fused kernel, as a careful PyTorch user trains (one multi-tensor kernel for all parameters).
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=1e-4, fused=True)
    s = cfg["img_size"]
    x = (torch.rand(args.batch, cfg["in_channels"], s, s) * 2 - 1).to(dev)
    k = max(cfg["num_classes"], 1)
    y = torch.randint(0, k, (args.batch,)).to(dev) if cfg["num_classes"] > 0 else None

    def train_step(phases=None):
        t0 = time.perf_counter()
        with autocast():
            z, _, logdet = model(x, y)
            loss = 0.5 * z.float().pow(2).mean() - logdet.mean()
        if phases is not None:
            sync()
            t1 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if phases is not None:
            sync()
            t2 = time.perf_counter()
        opt.step()
        if phases is not None:
            sync()
            for key, value in zip(("forward_s", "backward_s", "optimizer_s"), (t1 - t0, t2 - t1, time.perf_counter() - t2)):
                phases[key] = min(phases.get(key, math.inf), value)

    train_step()  # warm-up
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        train_step()
        sync()
        times.append(time.perf_counter() - t0)
    # Phases from separate steps: timing them synchronises the device in between.
    phases = {}
    for _ in range(args.steps):
        train_step(phases)
    n = (s // cfg["patch_size"]) ** 2
    d = cfg["in_channels"] * cfg["patch_size"] ** 2
    noise = torch.randn(args.sample_batch, n, d).to(dev)
    ys = y[: args.sample_batch] if y is not None else None
    runs = []
    for i in range(args.sample_repeats + 1):
        t0 = time.perf_counter()
        with autocast():
            model.reverse(noise, ys, args.guidance, True, 1.0, fast=True)
        sync()
        if i > 0:  # the first pass warms up
            runs.append(time.perf_counter() - t0)
    sample_s = min(runs)
    tokens = args.sample_batch * n * cfg["num_blocks"]
    print(json.dumps({"step_s": min(times), "step_s_mean": sum(times) / len(times), "phases": phases,
                      "sample_s": sample_s, "sample_s_runs": runs, "sample_tokens_per_s": tokens / sample_s}))


def main():
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("parity")
    for name in ("config", "weights", "inputs", "out"):
        p.add_argument(name)
    e = sub.add_parser("export")
    for name in ("config", "weights", "inputs", "out"):
        e.add_argument(name)
    b = sub.add_parser("bench")
    b.add_argument("config")
    b.add_argument("--batch", type=int, default=8)
    b.add_argument("--steps", type=int, default=3)
    b.add_argument("--sample-batch", type=int, default=8)
    b.add_argument("--sample-repeats", type=int, default=3)
    b.add_argument("--guidance", type=float, default=2.0)
    b.add_argument("--threads", type=int, default=1)
    b.add_argument("--device", default="cpu")
    b.add_argument("--bf16", action="store_true", help="bf16 autocast (CUDA only)")
    args = ap.parse_args()
    {"parity": parity, "export": export, "bench": bench}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
