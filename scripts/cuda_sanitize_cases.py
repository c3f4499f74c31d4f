"""Small calls that reach every CUDA kernel path once, for compute-sanitizer (memcheck and
racecheck) in scripts/gpu_check.sh. Sizes are small because the sanitizer slows kernels down
100x; each case still crosses tile edges, wraps the ring and uses GQA. Exits non-zero if an
output disagrees with the float64 reference, so a sanitizer run also proves the calls ran."""

import torch

import lm_infinite as li

DEV = "cuda"


def inv_freq(dim):
    return (1.0 / (10000 ** (torch.arange(0, dim, 2).float() / dim))).to(DEV)


def check(out, q, k, v, freqs, tol, **kw):
    ref = li.lambda_attention_reference(q.double().cpu(), k.double().cpu(), v.double().cpu(),
                                        freqs.cpu(), **kw)
    err = ((out.double().cpu() - ref).norm() / ref.norm()).item()
    assert err < tol, err
    return err


def main():
    torch.manual_seed(0)
    for dtype, dim in ((torch.bfloat16, 128), (torch.float16, 64), (torch.float32, 64),
                       (torch.bfloat16, 80)):
        # Prefill: 150 queries, window 70, 3 global keys (band edges, global tile, padding rows).
        q = torch.randn(1, 4, 150, dim, dtype=dtype, device=DEV)
        k = torch.randn(1, 2, 150, dim, dtype=dtype, device=DEV)
        v = torch.randn(1, 2, 150, dim, dtype=dtype, device=DEV)
        f = inv_freq(dim)
        out = li.lambda_attention(q, k, v, f, n_global=3, n_local=70)
        print(dtype, dim, "prefill err", check(out, q, k, v, f, 3e-2, n_global=3, n_local=70))

        # Streaming through the ring until the window has wrapped: a 90-token prompt against
        # the empty ring (cache tiles skipped), decode-mode chunks of 6 (split keys, merge) and
        # prefill-mode chunks of 24 and 30 against a full ring.
        cache = li.RingKVCache(1, 2, dim, n_global=3, n_local=70, dtype=dtype, device=DEV)
        outs = []
        for t, size in ((0, 90), (90, 6), (96, 24), (120, 6), (126, 24)):
            sl = slice(t, t + size)
            outs.append(cache.attend_and_append(q[:, :, sl], k[:, :, sl], v[:, :, sl], f))
        out = torch.cat(outs, 2)
        print(dtype, dim, "stream err", check(out, q, k, v, f, 3e-2, n_global=3, n_local=70))
    torch.cuda.synchronize()
    print("sanitizer cases ok")


if __name__ == "__main__":
    main()
