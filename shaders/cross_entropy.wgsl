// cross_entropy.wgsl — masked cross-entropy of the training loss and its gradient, in place.
//
// Computes: for each target row r (the logits of one position whose next token is a target),
//   loss[r] = logsumexp(z_r) − z_r[token_r], and overwrites the row with the loss's gradient
//   (softmax(z_r) − onehot(token_r)) · scale, where `scale` is 1 / (targets in the batch) so the
//   rows' gradients add up to the gradient of the mean.
// Layout: logits rows of n_vocab f32 (only the target rows: the LM head runs only there), tokens:
//   one u32 per row, loss: one f32 per row; the dispatch covers rows row0 .. row0 + rows of all
//   three (one training example's rows of a pass holding several, each with its own scale).
// Work split: one workgroup of 64 per row; each pass (max, sum, write) strides the row and reduces
//   in shared memory — the row is long (the vocabulary) and there are few rows.
// Limits: none beyond buffer sizes.

// `Params`, the uniform block, is generated from its Rust declaration (`uniform_block!` in
// src/kernels/loss.rs) and placed before this file.

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read_write> z: array<f32>;
@group(0) @binding(2) var<storage, read> tokens: array<u32>;
@group(0) @binding(3) var<storage, read_write> loss: array<f32>;

var<workgroup> red: array<f32, 64>;

fn reduce(lane: u32, v: f32, is_max: bool) -> f32 {
    red[lane] = v;
    workgroupBarrier();
    for (var s = 32u; s > 0u; s >>= 1u) {
        if (lane < s) {
            if (is_max) {
                red[lane] = max(red[lane], red[lane + s]);
            } else {
                red[lane] += red[lane + s];
            }
        }
        workgroupBarrier();
    }
    let out = red[0];
    workgroupBarrier();
    return out;
}

@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    if (wg.x >= p.rows) {
        return;
    }
    let r = p.row0 + wg.x;
    let lane = lid.x;
    let o = r * p.n_vocab;
    var m = -3.4e38;
    for (var i = lane; i < p.n_vocab; i += 64u) {
        m = max(m, z[o + i]);
    }
    m = reduce(lane, m, true);
    var s = 0.0;
    for (var i = lane; i < p.n_vocab; i += 64u) {
        s += exp(z[o + i] - m);
    }
    s = reduce(lane, s, false);
    let want = tokens[r];
    if (lane == 0u) {
        loss[r] = log(s) + m - z[o + want];
    }
    // Every lane has read what it needs of the row before any lane overwrites it.
    storageBarrier();
    workgroupBarrier();
    for (var i = lane; i < p.n_vocab; i += 64u) {
        var g = exp(z[o + i] - m) / s;
        if (i == want) {
            g -= 1.0;
        }
        z[o + i] = g * p.scale;
    }
}
