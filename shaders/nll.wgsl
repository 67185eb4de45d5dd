// Streaming log-softmax / negative log-likelihood over vocabulary chunks, so perplexity never reads
// logits back to the host. For each token row t of a logits chunk [tokens, width] covering vocab
// ids [v0, v0 + width), the running (max m, Σexp(x − m)) pair is merged with the chunk's and the
// target's logit is captured when it falls in the chunk. state[t] = (m, s, target logit, unused).
// After the last chunk: nll = m + ln s − target logit.

struct Params {
    tokens: u32,
    width: u32,
    v0: u32,
    first: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> logits: array<f32>;
@group(0) @binding(2) var<storage, read> targets: array<u32>;
@group(0) @binding(3) var<storage, read_write> state: array<vec4<f32>>;

var<workgroup> red: array<f32, 256>;

@compute @workgroup_size(256)
fn lse_chunk(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_id) lid3: vec3<u32>) {
    let t = wg.x + wg.y * nwg.x;
    if (t >= p.tokens) {
        return;
    }
    let lid = lid3.x;
    let base = t * p.width;
    var mx = -3.0e38;
    for (var i = lid; i < p.width; i += 256u) {
        mx = max(mx, logits[base + i]);
    }
    red[lid] = mx;
    workgroupBarrier();
    for (var s = 128u; s > 0u; s >>= 1u) {
        if (lid < s) {
            red[lid] = max(red[lid], red[lid + s]);
        }
        workgroupBarrier();
    }
    let cmax = red[0];
    workgroupBarrier();
    var sum = 0.0;
    for (var i = lid; i < p.width; i += 256u) {
        sum += exp(logits[base + i] - cmax);
    }
    red[lid] = sum;
    workgroupBarrier();
    for (var s = 128u; s > 0u; s >>= 1u) {
        if (lid < s) {
            red[lid] = red[lid] + red[lid + s];
        }
        workgroupBarrier();
    }
    if (lid == 0u) {
        var st = state[t];
        if (p.first != 0u) {
            st = vec4<f32>(cmax, red[0], 0.0, 0.0);
        } else {
            let m = max(st.x, cmax);
            st = vec4<f32>(m, st.y * exp(st.x - m) + red[0] * exp(cmax - m), st.z, 0.0);
        }
        let tg = targets[t];
        if (tg >= p.v0 && tg < p.v0 + p.width) {
            st.z = logits[base + (tg - p.v0)];
        }
        state[t] = st;
    }
}
