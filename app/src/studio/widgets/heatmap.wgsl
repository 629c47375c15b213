// Anomaly-map overlay, drawn by an egui_wgpu paint callback over the image egui has already drawn.
//
// The score map is R32Float, which is not filterable without a device feature: it is read with textureLoad and
// interpolated here, bilinearly with half-pixel centres (as the engine resizes maps), so the field is continuous
// and the threshold contour — drawn where |score − threshold| is within one screen pixel's change of the score
// (fwidth) — is a clean anti-aliased line with no speckle.

struct Uniforms {
    // x: decision threshold, y: colour-scale low, z: colour-scale high, w: opacity
    params: vec4<f32>,
    // x: colormap (0 jet, 1 inferno, 2 turbo), y: contour on, z: mask outline on, w: hide pixels below threshold
    flags: vec4<f32>,
    // The part of the image this draw covers, in texture coordinates: (u0, v0, u1, v1).
    uv_rect: vec4<f32>,
};

@group(0) @binding(0) var<uniform> u: Uniforms;
@group(0) @binding(1) var scores: texture_2d<f32>;
@group(0) @binding(2) var mask: texture_2d<f32>;

struct VertexOut {
    @builtin(position) position: vec4<f32>,
    @location(0) uv: vec2<f32>,
};

@vertex
fn vs_main(@builtin(vertex_index) index: u32) -> VertexOut {
    // Two triangles covering the callback's viewport.
    var corners = array<vec2<f32>, 6>(
        vec2<f32>(0.0, 0.0), vec2<f32>(1.0, 0.0), vec2<f32>(0.0, 1.0),
        vec2<f32>(0.0, 1.0), vec2<f32>(1.0, 0.0), vec2<f32>(1.0, 1.0),
    );
    let corner = corners[index];
    var out: VertexOut;
    out.position = vec4<f32>(corner.x * 2.0 - 1.0, 1.0 - corner.y * 2.0, 0.0, 1.0);
    out.uv = mix(u.uv_rect.xy, u.uv_rect.zw, corner);
    return out;
}

fn bilinear(tex: texture_2d<f32>, uv: vec2<f32>) -> f32 {
    let size = vec2<i32>(textureDimensions(tex));
    let position = uv * vec2<f32>(size) - vec2<f32>(0.5);
    let base = floor(position);
    let t = position - base;
    let last = size - vec2<i32>(1);
    let p0 = clamp(vec2<i32>(base), vec2<i32>(0), last);
    let p1 = clamp(vec2<i32>(base) + vec2<i32>(1), vec2<i32>(0), last);
    let a = textureLoad(tex, vec2<i32>(p0.x, p0.y), 0).r;
    let b = textureLoad(tex, vec2<i32>(p1.x, p0.y), 0).r;
    let c = textureLoad(tex, vec2<i32>(p0.x, p1.y), 0).r;
    let d = textureLoad(tex, vec2<i32>(p1.x, p1.y), 0).r;
    return mix(mix(a, b, t.x), mix(c, d, t.x), t.y);
}

fn jet(x: f32) -> vec3<f32> {
    return clamp(vec3<f32>(1.5 - abs(4.0 * x - 3.0), 1.5 - abs(4.0 * x - 2.0), 1.5 - abs(4.0 * x - 1.0)),
                 vec3<f32>(0.0), vec3<f32>(1.0));
}

// Polynomial fits of matplotlib's inferno and Google's turbo (max error ~1/255).
fn inferno(x: f32) -> vec3<f32> {
    let c0 = vec3<f32>(0.0002189403691192265, 0.001651004631001012, -0.01948089843709184);
    let c1 = vec3<f32>(0.1065134194856116, 0.5639564367884091, 3.932712388889277);
    let c2 = vec3<f32>(11.60249308247187, -3.972853965665698, -15.9423941062914);
    let c3 = vec3<f32>(-41.70399613139459, 17.43639888205313, 44.35414519872813);
    let c4 = vec3<f32>(77.162935699427, -33.40235894210092, -81.80730925738993);
    let c5 = vec3<f32>(-71.31942824499214, 32.62606426397723, 73.20951985803202);
    let c6 = vec3<f32>(25.13112622477341, -12.24266895238567, -23.07032500287172);
    return clamp(c0 + x * (c1 + x * (c2 + x * (c3 + x * (c4 + x * (c5 + x * c6))))), vec3<f32>(0.0), vec3<f32>(1.0));
}

fn turbo(x: f32) -> vec3<f32> {
    let r = vec4<f32>(0.13572138, 4.61539260, -42.66032258, 132.13108234);
    let g = vec4<f32>(0.09140261, 2.19418839, 4.84296658, -14.18503333);
    let b = vec4<f32>(0.10667330, 12.64194608, -60.58204836, 110.36276771);
    let r2 = vec2<f32>(-152.94239396, 59.28637943);
    let g2 = vec2<f32>(4.27729857, 2.82956604);
    let b2 = vec2<f32>(-89.90310912, 27.34824973);
    let v4 = vec4<f32>(1.0, x, x * x, x * x * x);
    let v2 = v4.zw * v4.z;
    return clamp(vec3<f32>(dot(v4, r) + dot(v2, r2), dot(v4, g) + dot(v2, g2), dot(v4, b) + dot(v2, b2)),
                 vec3<f32>(0.0), vec3<f32>(1.0));
}

@fragment
fn fs_main(in: VertexOut) -> @location(0) vec4<f32> {
    let threshold = u.params.x;
    let score = bilinear(scores, in.uv);
    let inside = bilinear(mask, in.uv);
    // Derivatives first, in uniform control flow.
    let score_step = max(fwidth(score), 1e-6);
    let mask_step = max(fwidth(inside), 1e-6);

    let scaled = clamp((score - u.params.y) / max(u.params.z - u.params.y, 1e-6), 0.0, 1.0);
    var colour: vec3<f32>;
    if (u.flags.x < 0.5) {
        colour = jet(scaled);
    } else if (u.flags.x < 1.5) {
        colour = inferno(scaled);
    } else {
        colour = turbo(scaled);
    }
    var alpha = u.params.w;
    if (u.flags.w > 0.5 && score < threshold) {
        alpha = 0.0;
    }
    // Premultiplied output, blended over the image.
    var out = vec4<f32>(colour * alpha, alpha);

    if (u.flags.y > 0.5) {
        let line = 1.0 - smoothstep(0.5, 1.5, abs(score - threshold) / score_step);
        out = mix(out, vec4<f32>(1.0, 1.0, 1.0, 1.0), line);
    }
    if (u.flags.z > 0.5) {
        let line = 1.0 - smoothstep(0.5, 1.5, abs(inside - 0.5) / mask_step);
        out = mix(out, vec4<f32>(0.1, 1.0, 0.3, 1.0), line);
    }
    return out;
}
