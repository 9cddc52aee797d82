//! Unit tests of the attention kernels: forward and backward against a plain float64 reference
//! (grouped heads, windows, soft-caps, packed documents), the float32 tanh, and argument errors.

use super::row::tanh_f32;
use super::*;

fn values(n: usize, k: usize) -> Vec<f32> {
    (0..n).map(|i| ((i * k % 97) as f32 - 48.0) / 40.0).collect()
}

fn dense(h: usize, t: usize, d: usize) -> Strides {
    Strides { batch: h * t * d, head: t * d, pos: d }
}

/// Plain f64 attention for one (b, h): (out, lse, dq, dk, dv) with dk, dv for this head only;
/// query i sees keys j <= i, and with a window only those with i - j < window. With a cap c the
/// logits are c tanh(s / c) of the scaled scores s, and dS picks up the factor 1 - tanh(s / c)^2.
#[allow(clippy::type_complexity, clippy::too_many_arguments)]
fn reference(
    q: &[f64],
    k: &[f64],
    v: &[f64],
    dout: &[f64],
    t: usize,
    d: usize,
    scale: f64,
    window: Option<usize>,
    cap: Option<f64>,
) -> (Vec<f64>, Vec<f64>, Vec<f64>, Vec<f64>, Vec<f64>) {
    let mut p = vec![0f64; t * t];
    let mut slope = vec![1f64; t * t];
    let mut lse = vec![0f64; t];
    for i in 0..t {
        let seen: Vec<usize> = (0..=i).filter(|&j| window.is_none_or(|w| i - j < w)).collect();
        let mut s: Vec<f64> =
            seen.iter().map(|&j| (0..d).map(|x| q[i * d + x] * k[j * d + x]).sum::<f64>() * scale).collect();
        if let Some(c) = cap {
            for (&j, sj) in seen.iter().zip(s.iter_mut()) {
                let th = (*sj / c).tanh();
                slope[i * t + j] = 1.0 - th * th;
                *sj = c * th;
            }
        }
        let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let z: f64 = s.iter().map(|x| (x - m).exp()).sum();
        lse[i] = m + z.ln();
        for (&j, &sj) in seen.iter().zip(&s) {
            p[i * t + j] = (sj - lse[i]).exp();
        }
    }
    let mm = |a: &dyn Fn(usize, usize) -> f64, b: &dyn Fn(usize, usize) -> f64, n: usize, kd: usize| -> Vec<f64> {
        let mut c = vec![0f64; n * d];
        for i in 0..n {
            for x in 0..d {
                c[i * d + x] = (0..kd).map(|j| a(i, j) * b(j, x)).sum();
            }
        }
        c
    };
    let out = mm(&|i, j| p[i * t + j], &|j, x| v[j * d + x], t, t);
    let mut ds = vec![0f64; t * t];
    for i in 0..t {
        let delta: f64 = (0..d).map(|x| dout[i * d + x] * out[i * d + x]).sum();
        for j in 0..=i {
            let dp: f64 = (0..d).map(|x| dout[i * d + x] * v[j * d + x]).sum();
            ds[i * t + j] = p[i * t + j] * (dp - delta) * slope[i * t + j] * scale;
        }
    }
    let dq = mm(&|i, j| ds[i * t + j], &|j, x| k[j * d + x], t, t);
    let dk = mm(&|j, i| ds[i * t + j], &|i, x| q[i * d + x], t, t);
    let dv = mm(&|j, i| p[i * t + j], &|i, x| dout[i * d + x], t, t);
    (out, lse, dq, dk, dv)
}

fn close(got: f32, want: f64, what: &str) {
    assert!((got as f64 - want).abs() <= 2e-5 * (1.0 + want.abs()), "{what}: {got} vs {want}");
}

#[test]
fn forward_and_backward_match_a_plain_f64_reference() {
    // grouped heads, a head dim of more than one tile width, T not a multiple of the tiles
    for (b, h, hkv, t, dim) in [(2, 4, 2, 53, 80), (1, 3, 3, 7, 16), (1, 2, 1, 1, 32), (1, 1, 1, 100, 64)] {
        check_against_reference(b, h, hkv, t, dim, None, None);
    }
}

#[test]
fn sliding_windows_match_a_plain_f64_reference() {
    // windows of one key, inside a tile, across tiles, blocks and vector widths, and longer than T;
    // T past two backward blocks so a block's first key is not 0
    for window in [1, 2, 5, 16, 17, 47, 48, 49, 97, 200] {
        for (b, h, hkv, t, dim) in [(1, 2, 1, 150, 32), (2, 4, 2, 53, 80), (1, 1, 1, 7, 16), (1, 1, 1, 1, 16)] {
            check_against_reference(b, h, hkv, t, dim, Some(window), None);
        }
    }
}

#[test]
fn soft_capped_scores_match_a_plain_f64_reference() {
    // caps that bite hard (below the scores), moderately, and hardly at all; with and without windows
    for cap in [0.3, 1.5, 50.0] {
        for (b, h, hkv, t, dim, window) in
            [(2, 4, 2, 53, 80, None), (1, 2, 1, 150, 32, Some(17)), (1, 1, 1, 7, 16, Some(2)), (1, 1, 1, 1, 16, None)]
        {
            check_against_reference(b, h, hkv, t, dim, window, Some(cap));
        }
    }
}

#[test]
fn tanh_matches_the_standard_library() {
    let mut worst = 0f64;
    for i in -40_000..=40_000 {
        let x = i as f32 * 5e-4;
        for y in [x, x * 1e-3, x * 40.0] {
            let want = (y as f64).tanh();
            worst = worst.max((tanh_f32(y) as f64 - want).abs() / want.abs().max(1e-30));
        }
    }
    assert!(worst < 4e-7, "largest relative error {worst}");
    assert_eq!(tanh_f32(1e30), 1.0);
    assert_eq!(tanh_f32(-1e30), -1.0);
    assert!(tanh_f32(f32::NAN).is_nan());
}

#[test]
fn caps_that_are_not_positive_and_finite_are_errors_and_write_nothing() {
    let (s, x) = (dense(1, 2, 16), vec![1f32; 32]);
    let (mut out, mut lse) = (vec![0f32; 32], vec![0f32; 2]);
    let input = Input { data: &x, strides: s };
    let dims = Dims { batch: 1, heads: 1, kv_heads: 1, seq: 2, dim: 16 };
    for cap in [0.0, -1.0, f32::NAN, f32::INFINITY] {
        let o = Output { data: &mut out, strides: s };
        let r = forward(input, input, input, o, &mut lse, dims, 0.25, None, Some(cap));
        assert!(matches!(&r, Err(Error::InvalidArgument(m)) if m.starts_with("attention: softcap")), "{r:?}");
        let docs = [Span { batch: 0, start: 0, len: 2 }];
        let o = Output { data: &mut out, strides: s };
        let r = forward_docs(input, input, input, o, &mut lse, dims, &docs, 0.25, None, Some(cap));
        assert!(matches!(&r, Err(Error::InvalidArgument(m)) if m.starts_with("attention: softcap")), "{r:?}");
    }
    assert!(out.iter().all(|&v| v == 0.0) && lse.iter().all(|&v| v == 0.0));
}

#[test]
fn a_window_of_no_keys_is_an_error() {
    let (s, x) = (dense(1, 2, 16), vec![1f32; 32]);
    let (mut out, mut lse) = (vec![0f32; 32], vec![0f32; 2]);
    let input = Input { data: &x, strides: s };
    let dims = Dims { batch: 1, heads: 1, kv_heads: 1, seq: 2, dim: 16 };
    let r = forward(input, input, input, Output { data: &mut out, strides: s }, &mut lse, dims, 0.25, Some(0), None);
    assert!(matches!(r, Err(Error::InvalidArgument(m)) if m.starts_with("attention: window 0")));
    assert!(out.iter().all(|&v| v == 0.0));
}

fn check_against_reference(
    b: usize,
    h: usize,
    hkv: usize,
    t: usize,
    dim: usize,
    window: Option<usize>,
    cap: Option<f32>,
) {
    {
        let dims = Dims { batch: b, heads: h, kv_heads: hkv, seq: t, dim };
        let scale = 1.0 / (dim as f32).sqrt();
        // q and dout in (B, T, H, D) order, as the training layer hands them over
        let bthd = Strides { batch: t * h * dim, head: dim, pos: h * dim };
        let (q, dout) = (values(b * h * t * dim, 7), values(b * h * t * dim, 13));
        let (k, v) = (values(b * hkv * t * dim, 11), values(b * hkv * t * dim, 5));
        let (kvs, qs) = (dense(hkv, t, dim), dense(h, t, dim));
        let mut out = vec![f32::NAN; q.len()];
        let mut lse = vec![f32::NAN; b * h * t];
        forward(
            Input { data: &q, strides: bthd },
            Input { data: &k, strides: kvs },
            Input { data: &v, strides: kvs },
            Output { data: &mut out, strides: bthd },
            &mut lse,
            dims,
            scale,
            window,
            cap,
        )
        .unwrap();
        let (mut dq, mut dk, mut dv) = (vec![f32::NAN; q.len()], vec![f32::NAN; k.len()], vec![f32::NAN; v.len()]);
        backward(
            Input { data: &dout, strides: bthd },
            Input { data: &q, strides: bthd },
            Input { data: &k, strides: kvs },
            Input { data: &v, strides: kvs },
            Input { data: &out, strides: bthd },
            &lse,
            Output { data: &mut dq, strides: qs },
            Output { data: &mut dk, strides: kvs },
            Output { data: &mut dv, strides: kvs },
            dims,
            scale,
            window,
            cap,
        )
        .unwrap();
        let mut dk_want = vec![0f64; k.len()];
        let mut dv_want = vec![0f64; v.len()];
        for bi in 0..b {
            for hi in 0..h {
                let kvh = hi / (h / hkv);
                let head = |x: &[f32], s: Strides, hh: usize| -> Vec<f64> {
                    (0..t).flat_map(|i| x[at(s, bi, hh, i)..][..dim].iter().map(|&y| y as f64)).collect()
                };
                let (o, l, gq, gk, gv) = reference(
                    &head(&q, bthd, hi),
                    &head(&k, kvs, kvh),
                    &head(&v, kvs, kvh),
                    &head(&dout, bthd, hi),
                    t,
                    dim,
                    scale as f64,
                    window,
                    cap.map(f64::from),
                );
                for i in 0..t {
                    close(lse[(bi * h + hi) * t + i], l[i], "lse");
                    for x in 0..dim {
                        close(out[at(bthd, bi, hi, i) + x], o[i * dim + x], "out");
                        close(dq[at(qs, bi, hi, i) + x], gq[i * dim + x], "dq");
                        dk_want[at(kvs, bi, kvh, i) + x] += gk[i * dim + x];
                        dv_want[at(kvs, bi, kvh, i) + x] += gv[i * dim + x];
                    }
                }
            }
        }
        for (i, (&g, &w)) in dk.iter().zip(&dk_want).enumerate() {
            close(g, w, &format!("dk[{i}] of {b}x{h}x{hkv}x{t}x{dim}, window {window:?}, cap {cap:?}"));
        }
        for (i, (&g, &w)) in dv.iter().zip(&dv_want).enumerate() {
            close(g, w, &format!("dv[{i}] of {b}x{h}x{hkv}x{t}x{dim}, window {window:?}, cap {cap:?}"));
        }
    }
}

#[test]
fn shapes_that_overflow_are_errors_not_wrapped() {
    let s = dense(1, 1, 16);
    let x = vec![1f32; 16];
    let (mut out, mut lse) = (vec![0f32; 16], vec![0f32; 1]);
    let call = |dims: Dims, qs: Strides, out: &mut [f32], lse: &mut [f32]| {
        let input = Input { data: &x, strides: qs };
        forward(input, input, input, Output { data: out, strides: s }, lse, dims, 0.25, None, None)
    };
    let message = |r: Result<()>| match r {
        Err(Error::InvalidArgument(m)) => m,
        other => panic!("expected InvalidArgument, got {other:?}"),
    };
    let one = Dims { batch: 1, heads: 1, kv_heads: 1, seq: 1, dim: 16 };
    // B x H x T x D = 2^62 x 2 x 16 x 16 wraps to 0
    let m = message(call(Dims { batch: 1 << 62, heads: 2, kv_heads: 1, ..one }, s, &mut out, &mut lse));
    assert!(m.starts_with("attention: shape B x H x T (padded) x D") && m.contains("does not fit"), "{m}");
    // a T whose padding to 16 overflows
    assert!(call(Dims { seq: usize::MAX - 3, ..one }, s, &mut out, &mut lse).is_err());
    // q's strides reach past usize::MAX
    let big = Dims { seq: 3, ..one };
    let m = message(call(big, Strides { pos: usize::MAX / 2 + 1, ..s }, &mut out, &mut lse));
    assert!(m.starts_with("attention: q holds 16 values") && m.contains("past the largest usize"), "{m}");
    assert!(out.iter().all(|&v| v == 0.0));
}

#[test]
fn bad_shapes_are_errors_and_write_nothing() {
    let s = dense(2, 4, 16);
    let x = vec![1f32; 128];
    let mut out = vec![0f32; 128];
    let mut lse = vec![0f32; 8];
    let dims = Dims { batch: 1, heads: 2, kv_heads: 1, seq: 4, dim: 16 };
    let kv = dense(1, 4, 16);
    let call = |dims: Dims, q: &[f32], out: &mut [f32], lse: &mut [f32]| {
        forward(
            Input { data: q, strides: s },
            Input { data: &x[..64], strides: kv },
            Input { data: &x[..64], strides: kv },
            Output { data: out, strides: s },
            lse,
            dims,
            0.25,
            None,
            None,
        )
    };
    assert!(call(Dims { dim: 12, ..dims }, &x, &mut out, &mut lse).is_err());
    assert!(call(Dims { kv_heads: 3, ..dims }, &x, &mut out, &mut lse).is_err());
    assert!(call(dims, &x[..127], &mut out, &mut lse).is_err());
    assert!(call(dims, &x, &mut out[..100], &mut lse).is_err());
    assert!(call(dims, &x, &mut out, &mut lse[..7]).is_err());
    assert!(out.iter().all(|&v| v == 0.0));
    call(dims, &x, &mut out, &mut lse).unwrap();
    assert!(out.iter().all(|&v| (v - 1.0).abs() < 1e-6));
}

#[test]
fn documents_attend_inside_themselves_only() {
    // windows: of one key, shorter than some documents, longer than all; with and without a cap
    for window in [None, Some(1), Some(4), Some(30)] {
        for cap in [None, Some(0.7)] {
            documents_match_the_reference(window, cap);
        }
    }
}

fn documents_match_the_reference(window: Option<usize>, cap: Option<f32>) {
    let (b, h, hkv, t, dim) = (2, 2, 1, 23, 16);
    let dims = Dims { batch: b, heads: h, kv_heads: hkv, seq: t, dim };
    let docs = [(0, 0, 1), (0, 1, 9), (0, 10, 13), (1, 0, 23)].map(|(batch, start, len)| Span { batch, start, len });
    let scale = 0.25;
    let (qs, kvs) = (dense(h, t, dim), dense(hkv, t, dim));
    let (q, dout) = (values(b * h * t * dim, 7), values(b * h * t * dim, 13));
    let (k, v) = (values(b * hkv * t * dim, 11), values(b * hkv * t * dim, 5));
    let mut out = vec![f32::NAN; q.len()];
    let mut lse = vec![f32::NAN; b * h * t];
    fn input(x: &[f32], s: Strides) -> Input<'_> {
        Input { data: x, strides: s }
    }
    forward_docs(
        input(&q, qs),
        input(&k, kvs),
        input(&v, kvs),
        Output { data: &mut out, strides: qs },
        &mut lse,
        dims,
        &docs,
        scale,
        window,
        cap,
    )
    .unwrap();
    let (mut dq, mut dk, mut dv) = (vec![f32::NAN; q.len()], vec![f32::NAN; k.len()], vec![f32::NAN; v.len()]);
    backward_docs(
        input(&dout, qs),
        input(&q, qs),
        input(&k, kvs),
        input(&v, kvs),
        input(&out, qs),
        &lse,
        Output { data: &mut dq, strides: qs },
        Output { data: &mut dk, strides: kvs },
        Output { data: &mut dv, strides: kvs },
        dims,
        &docs,
        scale,
        window,
        cap,
    )
    .unwrap();
    let mut done = 0;
    for doc in &docs {
        let (bi, n) = (doc.batch, doc.len);
        let (mut dk_want, mut dv_want) = (vec![0f64; n * dim], vec![0f64; n * dim]);
        for hi in 0..h {
            let head = |x: &[f32], s: Strides, hh: usize| -> Vec<f64> {
                (0..n).flat_map(|i| x[at(s, bi, hh, doc.start + i)..][..dim].iter().map(|&y| y as f64)).collect()
            };
            let (o, l, gq, gk, gv) = reference(
                &head(&q, qs, hi),
                &head(&k, kvs, 0),
                &head(&v, kvs, 0),
                &head(&dout, qs, hi),
                n,
                dim,
                0.25,
                window,
                cap.map(f64::from),
            );
            for i in 0..n {
                close(lse[done + hi * n + i], l[i], "lse");
                for x in 0..dim {
                    close(out[at(qs, bi, hi, doc.start + i) + x], o[i * dim + x], "out");
                    close(dq[at(qs, bi, hi, doc.start + i) + x], gq[i * dim + x], "dq");
                    dk_want[i * dim + x] += gk[i * dim + x];
                    dv_want[i * dim + x] += gv[i * dim + x];
                }
            }
        }
        for i in 0..n * dim {
            close(dk[at(kvs, bi, 0, doc.start) + i], dk_want[i], "dk");
            close(dv[at(kvs, bi, 0, doc.start) + i], dv_want[i], "dv");
        }
        done += h * n;
    }
}

#[test]
fn documents_that_do_not_tile_the_rows_are_errors_and_write_nothing() {
    let dims = Dims { batch: 1, heads: 1, kv_heads: 1, seq: 4, dim: 16 };
    let s = dense(1, 4, 16);
    let x = vec![1f32; 64];
    let (mut out, mut lse) = (vec![0f32; 64], vec![0f32; 4]);
    for docs in [
        vec![(0, 0, 3)],            // short of the row
        vec![(0, 0, 2), (0, 3, 1)], // a gap
        vec![(0, 0, 2), (0, 1, 3)], // an overlap
        vec![(0, 0, 0), (0, 0, 4)], // an empty document
        vec![(0, 0, 4), (1, 0, 4)], // a row that is not there
        vec![(0, 2, usize::MAX)],   // start + length overflows
    ] {
        let docs: Vec<Span> = docs.into_iter().map(|(batch, start, len)| Span { batch, start, len }).collect();
        let input = Input { data: &x, strides: s };
        let r = forward_docs(
            input,
            input,
            input,
            Output { data: &mut out, strides: s },
            &mut lse,
            dims,
            &docs,
            0.25,
            None,
            None,
        );
        let m = match r {
            Err(Error::InvalidArgument(m)) => m,
            other => panic!("expected an error for {docs:?}, got {other:?}"),
        };
        assert!(m.starts_with("attention: ") && m.contains("tile"), "{m}");
    }
    assert!(out.iter().all(|&v| v == 0.0) && lse.iter().all(|&v| v == 0.0));
}

/// A sequence of a decode test: its cache (two layers, the call on layer 1), filled with values.
fn decode_cache(h: Heads, capacity: usize, seed: usize) -> (Vec<f32>, Vec<f32>) {
    let n = 2 * h.kv_heads * capacity * h.dim;
    (values(n, seed), values(n, seed + 13))
}

/// f64 attention of one sequence's query heads over positions 0..=past of layer 1 of its cache
/// (the new key and value already at `past`), only the `window` latest with a window.
#[allow(clippy::too_many_arguments)]
fn decode_reference(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    h: Heads,
    capacity: usize,
    past: usize,
    window: Option<usize>,
) -> Vec<f64> {
    let first = window.map_or(0, |w| (past + 1).saturating_sub(w));
    let (d, group) = (h.dim, h.heads / h.kv_heads);
    let block = h.kv_heads * capacity * d;
    let scale = 1.0 / (d as f64).sqrt();
    let mut out = vec![0f64; h.heads * d];
    for head in 0..h.heads {
        let base = block + (head / group) * capacity * d;
        let s: Vec<f64> = (first..=past)
            .map(|j| (0..d).map(|x| q[head * d + x] as f64 * k[base + j * d + x] as f64).sum::<f64>() * scale)
            .collect();
        let top = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let e: Vec<f64> = s.iter().map(|x| (x - top).exp()).collect();
        let sum: f64 = e.iter().sum();
        for x in 0..d {
            out[head * d + x] = (first..=past).map(|j| e[j - first] * v[base + j * d + x] as f64).sum::<f64>() / sum;
        }
    }
    out
}

/// Runs one decode call over sequences with these (capacity, past) on layer 1; returns the output
/// and the caches after the call.
#[allow(clippy::type_complexity)]
fn run_decode(
    h: Heads,
    seqs: &[(usize, usize)],
    seed: usize,
    window: Option<usize>,
) -> (Vec<f32>, Vec<(Vec<f32>, Vec<f32>)>) {
    let n = seqs.len();
    let q = values(n * h.heads * h.dim, seed + 1);
    let k_new = values(n * h.kv_heads * h.dim, seed + 2);
    let v_new = values(n * h.kv_heads * h.dim, seed + 3);
    let mut stores: Vec<(Vec<f32>, Vec<f32>)> =
        seqs.iter().enumerate().map(|(i, &(cap, _))| decode_cache(h, cap, seed + 5 * i)).collect();
    let mut out = vec![f32::NAN; n * h.heads * h.dim];
    let mut caches: Vec<Cache<'_>> = stores
        .iter_mut()
        .zip(seqs)
        .map(|((k, v), &(capacity, past))| Cache { k, v, offset: h.kv_heads * capacity * h.dim, capacity, past })
        .collect();
    decode(Step { q: &q, k: &k_new, v: &v_new }, &mut caches, &mut out, h, 1.0 / (h.dim as f32).sqrt(), window)
        .unwrap();
    (out, stores)
}

#[test]
fn decode_matches_a_float64_reference_over_awkward_lengths_and_heads() {
    let seqs = [(5, 0), (3, 1), (40, 15), (17, 16), (64, 17), (50, 49), (300, 257)];
    for (h, window) in [
        (Heads { heads: 4, kv_heads: 2, dim: 16 }, None),
        (Heads { heads: 3, kv_heads: 3, dim: 48 }, None),
        (Heads { heads: 6, kv_heads: 1, dim: 32 }, Some(1)),
        (Heads { heads: 9, kv_heads: 3, dim: 64 }, None),
        (Heads { heads: 4, kv_heads: 2, dim: 16 }, Some(17)),
    ] {
        let (out, stores) = run_decode(h, &seqs, 7, window);
        let n = seqs.len();
        let k_new = values(n * h.kv_heads * h.dim, 9);
        let v_new = values(n * h.kv_heads * h.dim, 10);
        let q = values(n * h.heads * h.dim, 8);
        for (i, (&(capacity, past), (k, v))) in seqs.iter().zip(&stores).enumerate() {
            // the new key and value sit at `past` of layer 1; every other value is as it was
            let (k0, v0) = decode_cache(h, capacity, 7 + 5 * i);
            let block = h.kv_heads * capacity * h.dim;
            for g in 0..h.kv_heads {
                let at = block + (g * capacity + past) * h.dim;
                let from = (i * h.kv_heads + g) * h.dim;
                assert_eq!(&k[at..at + h.dim], &k_new[from..from + h.dim]);
                assert_eq!(&v[at..at + h.dim], &v_new[from..from + h.dim]);
            }
            let changed = |a: &[f32], b: &[f32]| a.iter().zip(b).filter(|(x, y)| x != y).count();
            assert!(changed(k, &k0) <= h.kv_heads * h.dim && changed(v, &v0) <= h.kv_heads * h.dim);
            let want = decode_reference(&q[i * h.heads * h.dim..], k, v, h, capacity, past, window);
            let got = &out[i * h.heads * h.dim..(i + 1) * h.heads * h.dim];
            for (x, (g, w)) in got.iter().zip(&want).enumerate() {
                assert!((*g as f64 - w).abs() < 2e-5, "{h:?} seq {i} value {x}: {g} vs {w}");
            }
        }
    }
}

#[test]
fn decode_rows_equal_each_sequence_decoded_alone_bit_for_bit() {
    // long enough that the batched call splits over the decode pool's threads
    let h = Heads { heads: 9, kv_heads: 3, dim: 64 };
    let seqs = [(400, 300), (20, 3), (512, 511), (64, 0), (300, 150)];
    let (out, stores) = run_decode(h, &seqs, 3, None);
    let per = h.heads * h.dim;
    for (i, &(capacity, past)) in seqs.iter().enumerate() {
        let q = values(seqs.len() * per, 4);
        let k_new = values(seqs.len() * h.kv_heads * h.dim, 5);
        let v_new = values(seqs.len() * h.kv_heads * h.dim, 6);
        let (mut k, mut v) = decode_cache(h, capacity, 3 + 5 * i);
        let kv = h.kv_heads * h.dim;
        let mut alone = vec![0f32; per];
        let mut cache = [Cache { k: &mut k, v: &mut v, offset: h.kv_heads * capacity * h.dim, capacity, past }];
        let (qi, ki, vi) = (&q[i * per..(i + 1) * per], &k_new[i * kv..(i + 1) * kv], &v_new[i * kv..(i + 1) * kv]);
        decode(Step { q: qi, k: ki, v: vi }, &mut cache, &mut alone, h, 1.0 / 8.0, None).unwrap();
        let bits = |x: &[f32]| x.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&out[i * per..(i + 1) * per]), bits(&alone), "sequence {i}");
        assert_eq!((&k, &v), (&stores[i].0, &stores[i].1));
    }
}

#[test]
fn decode_refuses_bad_shapes_with_errors() {
    let h = Heads { heads: 4, kv_heads: 2, dim: 16 };
    let (q, kv) = (vec![0f32; 64], vec![0f32; 32]);
    let call = |h: Heads, q: &[f32], cap: usize, past: usize, store: usize, offset: usize| {
        let (mut k, mut v) = (vec![0f32; store], vec![0f32; store]);
        let mut out = vec![0f32; q.len()];
        let mut caches = [Cache { k: &mut k, v: &mut v, offset, capacity: cap, past }];
        decode(Step { q, k: &kv, v: &kv }, &mut caches, &mut out, h, 0.25, None).unwrap_err().to_string()
    };
    assert!(call(Heads { dim: 12, ..h }, &q, 4, 0, 128, 0).contains("head dim 12"));
    assert!(call(Heads { kv_heads: 3, ..h }, &q, 4, 0, 128, 0).contains("4 query heads over 3"));
    assert!(call(h, &q[..60], 4, 0, 128, 0).contains("q holds 60 values; expected 64"));
    assert!(call(h, &q, 4, 4, 128, 0).contains("no room for the new token"));
    assert!(call(h, &q, 4, 0, 127, 0).contains("cache 0's keys hold 127 values"));
    assert!(call(h, &q, 4, 0, 128, usize::MAX).contains("does not fit"));
    assert!(call(h, &q, usize::MAX, 0, 128, 0).contains("does not fit in a usize"));
    let (mut k, mut v) = (vec![0f32; 128], vec![0f32; 128]);
    let mut caches = [Cache { k: &mut k, v: &mut v, offset: 0, capacity: 4, past: 0 }];
    let err = decode(Step { q: &q, k: &kv, v: &kv }, &mut caches, &mut vec![0f32; 64], h, 0.25, Some(0)).unwrap_err();
    assert!(err.to_string().contains("window 0"));
    // no sequences: nothing to do
    decode(Step { q: &[], k: &[], v: &[] }, &mut [], &mut [], h, 0.25, None).unwrap();
}
