#!/usr/bin/env python3
# SPDX-License-Identifier: MIT
"""On the GPU machine: PyTorch baselines beside moba_bench_cuda, at issue 5's configs (bf16, batch 1,
16 heads, head dim 128): SDPA dense causal (cuDNN and FlashAttention-2 backends) and FlexAttention
with the MoBA block mask (fp32 gate, the same selection rule), and FlashMoBA (mit-han-lab/flash-moba)
where a build of it can be imported: this project ships no copy of it and no script that builds it.
Prints ms (median of CUDA-event timings), TFLOP/s on the pairs each one attends (4·D FLOPs per pair)
and extra device memory.
Usage: python3 scripts/gpu/compare.py [--flex-max N] > table; JSON lines go to $OUT/compare.jsonl."""
import argparse, json, os, statistics
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

H, D = 16, 128


def timed(fn, reps, warm=2):
    for _ in range(warm):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record(); fn(); b.record(); b.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def moba_pairs(n, block, top_k):
    pos = torch.arange(n, dtype=torch.int64)
    c = pos // block
    return int(((pos - c * block + 1) + torch.clamp(c, max=top_k - 1) * block).sum()) * H


def moba_selection(q, k, block, top_k):
    """[H, N, blocks] bool: SPEC §Blocks with fp32 scores (ties to the lower index via a tiny ramp is
    not needed on random inputs)."""
    n = q.shape[2]
    nb = n // block
    kbar = k.float().view(1, H, nb, block, D).mean(3)[0]  # [H, nb, D]
    sel = torch.zeros(H, n, nb, dtype=torch.bool, device=q.device)
    for h in range(H):
        s = q[0, h].float() @ kbar[h].T  # [N, nb]
        c = torch.arange(n, device=q.device) // block
        s = s.masked_fill(torch.arange(nb, device=q.device)[None, :] >= c[:, None], float("-inf"))
        if top_k > 1:
            idx = s.topk(min(top_k - 1, nb), dim=1).indices
            ok = torch.gather(s, 1, idx) > float("-inf")
            sel[h].scatter_(1, idx, ok)
        sel[h, torch.arange(n, device=q.device), c] = True
    return sel


def flashmoba_rows(fm, q, k, v, block, top_k):
    """FlashMoBA's varlen forward with its own gate (block means, top-k with the current block counted
    in top_k as here, sort), called as its authors' benchmark does; its gate alone is printed too."""
    n = q.shape[2]
    pq, pk, pv = (x[0].transpose(0, 1).contiguous() for x in (q, k, v))  # [N, H, D]
    cu = torch.tensor([0, n], dtype=torch.int32, device="cuda")
    base = torch.cuda.memory_allocated()
    reps = 3 if n > 200000 else 10
    try:
        torch.cuda.reset_peak_memory_stats()
        ms = timed(lambda: fm.flash_moba_varlen_func(pq, pk, pv, cu, cu, n, n, block, top_k, causal=True), reps)
        extra = torch.cuda.max_memory_allocated() - base - q.numel() * 2  # beyond its output, as for SDPA
        gate_ms = timed(lambda: fm.flash_topk_varlen_func(pq, pk, cu, cu, n, n, top_k, block, causal=True), reps)
        print(f"  (FlashMoBA gate alone: {gate_ms:.2f} ms)")
        return [(f"flashmoba/sparse/N={n}/B={block}/K={top_k}", ms, 4.0 * D * moba_pairs(n, block, top_k), extra)]
    except Exception as e:
        print(f"flashmoba N={n}: {type(e).__name__}: {str(e)[:200]}")
        return []


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--flex-max", type=int, default=131072)
    ap.add_argument("--dense-max", type=int, default=524288)
    args = ap.parse_args()
    out = open(os.path.join(os.environ.get("OUT", "."), "compare.jsonl"), "a")
    configs = [(32768, 512, 3), (131072, 2048, 3), (524288, 8192, 3), (131072, 128, 16)]
    dense_done = set()
    try:
        import flash_moba as flashmoba
    except ImportError:
        flashmoba = None
        print("FlashMoBA: not importable here, not run")
    print(f"{'what':44s} {'ms':>10s} {'TFLOP/s':>9s} {'extra MiB':>10s}")
    for n, block, top_k in configs:
        g = torch.Generator(device="cuda").manual_seed(n + block)
        q, k, v = (torch.randn(1, H, n, D, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(3))
        base = torch.cuda.memory_allocated()
        rows = []
        if n not in dense_done and n <= args.dense_max:
            dense_done.add(n)
            for name, be in (("cudnn", SDPBackend.CUDNN_ATTENTION), ("flash2", SDPBackend.FLASH_ATTENTION)):
                try:
                    torch.cuda.reset_peak_memory_stats()
                    with sdpa_kernel(be):
                        ms = timed(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True), 3 if n > 200000 else 10)
                    extra = torch.cuda.max_memory_allocated() - base - q.numel() * 2
                    rows.append((f"sdpa-{name}/dense/N={n}", ms, 4.0 * D * H * n * (n + 1) / 2, extra))
                except Exception as e:  # a backend that does not run here is reported, not fatal
                    print(f"sdpa-{name} N={n}: {type(e).__name__}: {str(e)[:120]}")
        if n <= args.flex_max:
            try:
                from torch.nn.attention.flex_attention import flex_attention, create_block_mask
                t0 = torch.cuda.Event(enable_timing=True); t1 = torch.cuda.Event(enable_timing=True)
                t0.record()
                sel = moba_selection(q, k, block, top_k)
                t1.record(); t1.synchronize()
                gate_ms = t0.elapsed_time(t1)

                def mask_mod(b, h, qi, ki):
                    return (ki <= qi) & sel[h, qi, ki // block]

                bm = create_block_mask(mask_mod, 1, H, n, n, device="cuda", _compile=True)
                flex = torch.compile(flex_attention)
                torch.cuda.reset_peak_memory_stats()
                ms = timed(lambda: flex(q, k, v, block_mask=bm), 5)
                extra = torch.cuda.max_memory_allocated() - base - q.numel() * 2
                rows.append((f"flex-moba/sparse/N={n}/B={block}/K={top_k}", ms, 4.0 * D * moba_pairs(n, block, top_k), extra))
                print(f"  (flex gate in torch fp32: {gate_ms:.1f} ms, not included)")
                del sel, bm
            except Exception as e:
                print(f"flex N={n}: {type(e).__name__}: {str(e)[:200]}")
        if flashmoba is not None:
            rows += flashmoba_rows(flashmoba, q, k, v, block, top_k)
        for name, ms, flops, extra in rows:
            print(f"{name:44s} {ms:10.2f} {flops / ms / 1e9:9.1f} {extra / 2**20:10.1f}")
            out.write(json.dumps({"name": name, "ms": ms, "tflops": flops / ms / 1e9, "extra_bytes": extra}) + "\n")
        del q, k, v
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
