"""GLSL 3.30 sources: the lit instanced pass, the shadow depth pass and the sky.

Lighting is in linear space: textures are decoded with a gamma of 2 (x * x, close to sRGB and far cheaper than
pow() on a CPU rasteriser such as llvmpipe), and the result is tone-mapped (exponential) and re-encoded with sqrt
at the end of each fragment shader, since the colour target is plain RGBA8.
"""

from __future__ import annotations

# Shared by the sky pass (full version with sun disc and clouds) and the lit pass (fog and reflections).
_SKY = """
uniform vec3 u_sun_dir;
uniform vec3 u_sun_colour;
uniform vec3 u_sky_top;
uniform vec3 u_sky_horizon;
uniform vec3 u_ground;

vec3 sky_gradient(vec3 d) {
    float up = clamp(d.y, -1.0, 1.0);
    vec3 sky = mix(u_sky_horizon, u_sky_top, sqrt(max(up, 0.0)));
    vec3 below = mix(u_sky_horizon, u_ground, clamp(-up * 6.0, 0.0, 1.0));
    vec3 c = up >= 0.0 ? sky : below;
    float sun = max(dot(d, u_sun_dir), 0.0);
    sun *= sun;
    sun *= sun;
    return c + u_sun_colour * 0.08 * sun * sun;
}
"""

_INSTANCE_VS = """
in vec3 in_pos;
in vec3 in_normal;
in vec2 in_uv;
in mat4 in_model;
in vec4 in_tint;    // rgb tint, w = texture layer
in vec4 in_uvrect;  // uv offset xy, uv scale zw

uniform float u_box_uv;

vec2 instance_uv(vec3 scale) {
    vec2 uv = in_uv;
    if (u_box_uv > 0.0) {
        // World-scaled box mapping keeps texel density constant however an instance is stretched.
        vec3 p = in_pos * scale;
        vec3 right = cross(vec3(0.0, 1.0, 0.0), in_normal);
        uv = abs(in_normal.y) > 0.5 ? vec2(p.x, -p.z * in_normal.y) : vec2(dot(p, right), p.y);
        uv *= u_box_uv;
    }
    return in_uvrect.xy + uv * in_uvrect.zw;
}
"""

LIT_VERTEX = (
    "#version 330 core\n"
    + _INSTANCE_VS
    + """
uniform mat4 u_view_proj;
uniform mat4 u_light_vp;
uniform float u_shadow_offset;

out vec3 v_world;
out vec3 v_normal;
out vec2 v_uv;
out vec4 v_tint;
out vec4 v_light;
void main() {
    mat3 m = mat3(in_model);
    vec3 scale2 = vec3(dot(m[0], m[0]), dot(m[1], m[1]), dot(m[2], m[2]));
    vec4 world = in_model * vec4(in_pos, 1.0);
    // Instances are rotation * scale, for which m * (n / scale^2) is the inverse-transpose normal.
    vec3 n = normalize(m * (in_normal / scale2));
    v_world = world.xyz;
    v_normal = n;
    v_uv = instance_uv(sqrt(scale2));
    v_tint = in_tint;
    // Offsetting along the normal before the light lookup avoids shadow acne on slanted surfaces.
    v_light = u_light_vp * vec4(world.xyz + n * u_shadow_offset, 1.0);
    gl_Position = u_view_proj * world;
}
"""
)

LIT_FRAGMENT = (
    "#version 330 core\n"
    + _SKY
    + """
uniform sampler2DArray u_textures;
uniform sampler2DShadow u_shadow_map;
uniform vec3 u_eye;
uniform float u_ambient;
uniform float u_fog_density;
uniform float u_exposure;
uniform float u_specular;
uniform float u_shininess;
uniform float u_reflect;
uniform float u_emissive;
uniform float u_alpha_cut;

in vec3 v_world;
in vec3 v_normal;
in vec2 v_uv;
in vec4 v_tint;
in vec4 v_light;

out vec4 f_colour;

float sun_visibility() {
    vec3 p = v_light.xyz / v_light.w * 0.5 + 0.5;
    if (any(lessThan(p, vec3(0.0))) || any(greaterThan(p, vec3(1.0)))) {
        return 1.0;
    }
    // One linear-filtered compare is a 2 x 2 PCF; more taps cost more than the rest of the shader on llvmpipe.
    return texture(u_shadow_map, p);
}

void main() {
    vec4 tex = texture(u_textures, vec3(v_uv, v_tint.w));
    if (u_alpha_cut > 0.0 && tex.a < u_alpha_cut) {
        discard;
    }
    vec3 albedo = tex.rgb * tex.rgb * v_tint.rgb;
    float mask = u_alpha_cut > 0.0 ? 1.0 : tex.a;
    vec3 n = normalize(gl_FrontFacing ? v_normal : -v_normal);
    vec3 to_eye = u_eye - v_world;
    float dist = length(to_eye);
    vec3 v = to_eye / dist;
    vec3 l = u_sun_dir;
    // Foliage cards are lit through (wrapped diffuse) so that their back faces are not black.
    float ndl = u_alpha_cut > 0.0 ? abs(dot(n, l)) * 0.8 + 0.2 : max(dot(n, l), 0.0);
    float shadow = sun_visibility();
    vec3 h = normalize(l + v);
    float spec = u_specular * mask * pow(max(dot(n, h), 0.0), u_shininess) * step(0.0, dot(n, l));
    vec3 hemi = mix(u_ground, mix(u_sky_horizon, u_sky_top, 0.6), n.y * 0.5 + 0.5) * u_ambient;
    vec3 colour = albedo * (hemi + u_sun_colour * ndl * shadow) + u_sun_colour * spec * shadow;
    if (u_reflect > 0.0) {
        float f = 1.0 - max(dot(n, v), 0.0);
        float fresnel = 0.04 + 0.96 * f * f * f * f * f;
        colour += sky_gradient(reflect(-v, n)) * u_reflect * mask * mix(0.25, 1.0, fresnel);
    }
    colour += albedo * u_emissive;
    float fog = 1.0 - exp(-u_fog_density * dist);
    colour = mix(colour, sky_gradient(normalize(vec3(-v.x, max(-v.y, 0.02), -v.z))), fog);
    colour = 1.0 - exp(-colour * u_exposure);
    f_colour = vec4(sqrt(colour), 1.0);
}
"""
)

SHADOW_VERTEX = (
    "#version 330 core\n"
    + _INSTANCE_VS
    + """
uniform mat4 u_light_vp;
out vec3 v_uvl;
void main() {
    mat3 m = mat3(in_model);
    vec3 scale = vec3(length(m[0]), length(m[1]), length(m[2]));
    v_uvl = vec3(instance_uv(scale), in_tint.w);
    gl_Position = u_light_vp * (in_model * vec4(in_pos, 1.0));
}
"""
)

SHADOW_FRAGMENT = """
#version 330 core
uniform sampler2DArray u_textures;
uniform float u_alpha_cut;
in vec3 v_uvl;

void main() {
    // Alpha-tested leaves and fences cast dappled shadows, not solid card shapes.
    if (u_alpha_cut > 0.0 && texture(u_textures, v_uvl).a < u_alpha_cut) {
        discard;
    }
}
"""

SKY_VERTEX = """
#version 330 core
out vec2 v_ndc;

void main() {
    // One triangle covering the screen, at the far plane so that only pixels left empty pass the depth test.
    vec2 p = vec2(gl_VertexID == 1 ? 3.0 : -1.0, gl_VertexID == 2 ? 3.0 : -1.0);
    v_ndc = p;
    gl_Position = vec4(p, 1.0, 1.0);
}
"""

SKY_FRAGMENT = (
    "#version 330 core\n"
    + _SKY
    + """
uniform mat4 u_inv_view_proj;
uniform vec3 u_eye;
uniform float u_exposure;
uniform float u_cloud_cover;
in vec2 v_ndc;
out vec4 f_colour;

float hash(vec2 p) {
    return fract(sin(dot(p, vec2(127.1, 311.7))) * 43758.5453);
}

float noise(vec2 p) {
    vec2 i = floor(p);
    vec2 f = fract(p);
    f = f * f * (3.0 - 2.0 * f);
    return mix(mix(hash(i), hash(i + vec2(1.0, 0.0)), f.x), mix(hash(i + vec2(0.0, 1.0)), hash(i + 1.0), f.x), f.y);
}

void main() {
    vec4 far = u_inv_view_proj * vec4(v_ndc, 1.0, 1.0);
    vec3 d = normalize(far.xyz / far.w - u_eye);
    vec3 colour = sky_gradient(d);
    if (d.y > 0.0) {
        vec2 p = d.xz / (d.y + 0.08) * 1.5;
        float n = noise(p) * 0.5 + noise(p * 2.1 + 7.0) * 0.3 + noise(p * 4.3 + 3.0) * 0.2;
        float cloud = smoothstep(1.0 - u_cloud_cover, 1.15 - u_cloud_cover * 0.5, n) * smoothstep(0.0, 0.15, d.y);
        colour = mix(colour, u_sun_colour * 0.3 + u_sky_horizon * 0.6, cloud * 0.8);
    }
    colour += u_sun_colour * smoothstep(0.9992, 0.9996, dot(d, u_sun_dir)) * 4.0;
    colour = 1.0 - exp(-colour * u_exposure);
    f_colour = vec4(sqrt(colour), 1.0);
}
"""
)
