"""The moderngl renderer: per-pixel lit, shadow-mapped, fogged instanced scenes, headless or in a window.

GPU resources are created lazily on the first frame: the texture array and meshes once per renderer, the
instance buffers and the (static) sun shadow map once per preset. Nothing touches OpenGL at import time.
"""

from __future__ import annotations

import math
import weakref
from collections import OrderedDict
from dataclasses import dataclass
from numbers import Integral
from typing import Protocol, TypeVar

import moderngl
import numpy as np

from scenes import shaders
from scenes.camera import Camera, orthographic, perspective, view_matrix
from scenes.geometry import meshes
from scenes.presets import build_scene, camera_at, check_preset
from scenes.scene import Batch, Environment
from scenes.textures import TEXTURE_SIZE, texture_stack

SHADOW_MAP_SIZE = 2048
_MAX_CACHED_TARGETS = 4  # LR and HR sizes of a training run alternate; keep both without growing forever
_MESH_FORMAT = ("3f 3f 2f", "in_pos", "in_normal", "in_uv")
_INSTANCE_FORMAT = ("16f 4f 4f/i", "in_model", "in_tint", "in_uvrect")
# Anisotropic filtering is nearly free on GPUs but makes llvmpipe frames about 3x slower (measured), so "auto"
# turns it off on software rasterisers.
_SOFTWARE_RENDERERS = ("llvmpipe", "softpipe", "swrast", "swiftshader", "lavapipe")


class HeadlessContextError(RuntimeError):
    """No headless OpenGL 3.3 context can be made here (no EGL, no GPU driver or llvmpipe)."""


def create_headless_context() -> moderngl.Context:
    """A standalone OpenGL 3.3+ context through EGL (works without a display, e.g. Mesa llvmpipe).

    Create it only after any GLX window in the same process, or not at all when a window exists: EGL first,
    then GLX, crashes in Mesa.
    """
    try:
        return moderngl.create_standalone_context(backend="egl", require=330)
    except Exception as exc:
        raise HeadlessContextError(
            "could not create a headless EGL OpenGL 3.3 context; install Mesa's EGL (libegl1, libgl1-mesa-dri) "
            "or pass the context of an existing window to SceneRenderer(ctx)"
        ) from exc


class _GLObject(Protocol):
    def release(self) -> None: ...


_T = TypeVar("_T", bound=_GLObject)


@dataclass
class _Draw:
    batch: Batch
    lit: moderngl.VertexArray
    shadow: moderngl.VertexArray


@dataclass
class _PresetGpu:
    draws: list[_Draw]
    environment: Environment
    light_vp: np.ndarray
    shadow_map: moderngl.Texture
    shadow_offset: float  # world-space normal offset for shadow lookups, about 1.5 texels


def _set(program: moderngl.Program, **values: object) -> None:
    """Set uniforms, skipping ones the compiler removed; numpy matrices are sent column-major."""
    for name, value in values.items():
        member = program.get(name, None)
        if member is None:
            continue
        if isinstance(value, np.ndarray):
            member.write(np.ascontiguousarray(value.T, dtype="f4").tobytes())
        else:
            member.value = value


def _light_matrix(env: Environment) -> tuple[np.ndarray, float]:
    """Orthographic sun view-projection fitted around the scene's shadow box; also the normal offset."""
    sun = np.asarray(env.sun_direction, np.float64)
    sun /= np.linalg.norm(sun)
    forward = -sun
    helper = np.array([0.0, 0.0, 1.0]) if abs(forward[1]) > 0.99 else np.array([0.0, 1.0, 0.0])
    right = np.cross(forward, helper)
    right /= np.linalg.norm(right)
    up = np.cross(right, forward)
    view = np.eye(4)
    view[0, :3], view[1, :3], view[2, :3] = right, up, -forward
    lo, hi = np.asarray(env.shadow_min), np.asarray(env.shadow_max)
    corners = np.array([[x, y, z, 1.0] for x in (lo[0], hi[0]) for y in (lo[1], hi[1]) for z in (lo[2], hi[2])])
    eye_space = corners @ view.T
    mn, mx = eye_space.min(axis=0), eye_space.max(axis=0)
    proj = orthographic(mn[0], mx[0], mn[1], mx[1], -mx[2] - 1.0, -mn[2] + 1.0)
    texel = max(mx[0] - mn[0], mx[1] - mn[1]) / SHADOW_MAP_SIZE
    return proj @ view, 1.5 * texel


def _box_downsample(image: np.ndarray, k: int) -> np.ndarray:
    """Mean of each k x k block, rounded: the anti-aliased ground truth from a k-times supersampled frame."""
    h, w = image.shape[0] // k, image.shape[1] // k
    sums = image.reshape(h, k, w, k, 3).sum(axis=(1, 3), dtype=np.uint32)
    return np.rint(sums / float(k * k)).astype(np.uint8)


def _check_arguments(preset: str, t: float, width: int, height: int, supersample: int) -> None:
    check_preset(preset)
    if not isinstance(t, int | float | np.floating | np.integer) or not math.isfinite(t):
        raise ValueError(f"time t must be a finite number of seconds, got {t!r}")
    for name, value in (("width", width), ("height", height), ("supersample", supersample)):
        if isinstance(value, bool) or not isinstance(value, Integral) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")


class SceneRenderer:
    """Renders the presets into numpy frames (headless) or into a framebuffer the caller owns (demo).

    ``ctx=None`` creates a headless EGL context on first use and owns it; a context passed in (e.g. a glfw
    window's) is borrowed and never released here. ``anisotropy`` is the texture filtering level (clamped to
    the driver's maximum, 1 = off); None picks the maximum on GPUs and 1 on software rasterisers.
    """

    def __init__(self, ctx: moderngl.Context | None = None, *, anisotropy: float | None = None) -> None:
        if anisotropy is not None and not anisotropy >= 1.0:
            raise ValueError(f"anisotropy must be >= 1 (1 = off) or None for automatic, got {anisotropy!r}")
        self._ctx = ctx
        self._owns_ctx = ctx is None
        self._finalizer: weakref.finalize | None = None  # releases an owned context if release() is never called
        self._anisotropy = anisotropy
        self._reset()

    def __enter__(self) -> SceneRenderer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def _reset(self) -> None:
        self._objects: list[_GLObject] = []  # every GL object created here, released in release()
        self._programs: dict[str, moderngl.Program] = {}
        self._textures: moderngl.TextureArray | None = None
        self._mesh_buffers: dict[str, moderngl.Buffer] = {}
        self._sky: moderngl.VertexArray | None = None
        self._presets: dict[str, _PresetGpu] = {}
        self._targets: OrderedDict[tuple[int, int], moderngl.Framebuffer] = OrderedDict()

    @property
    def ctx(self) -> moderngl.Context:
        """The OpenGL context, created headless on first access if none was given."""
        if self._ctx is None:
            self._ctx = create_headless_context()
            # a renderer dropped without release() must not keep its context (tens of MB each on llvmpipe)
            self._finalizer = weakref.finalize(self, self._ctx.release)
            self._finalizer.atexit = False  # the process is ending: the driver frees everything anyway
        return self._ctx

    def _activate(self) -> moderngl.Context:
        """Make our context current before touching GL.

        moderngl does not switch contexts by itself, so with two in one process (a second renderer, a window) calls
        would go to whichever was made current last. Entered and deliberately not exited: glcontext's exit unbinds
        every context instead of restoring the caller's, which would break a window's own drawing afterwards.
        """
        ctx = self.ctx
        ctx.__enter__()
        return ctx

    def max_size(self) -> int:
        """Largest width or height (after supersampling) this context can render to."""
        info = self._activate().info
        return int(min(*info["GL_MAX_VIEWPORT_DIMS"], info["GL_MAX_RENDERBUFFER_SIZE"]))

    def render(
        self,
        preset: str,
        t: float,
        width: int,
        height: int,
        *,
        supersample: int = 1,
        camera: Camera | None = None,
    ) -> np.ndarray:
        """(height, width, 3) uint8 RGB, row 0 at the top; supersample k renders k times larger and box-filters."""
        _check_arguments(preset, t, width, height, supersample)
        w, h = width * supersample, height * supersample
        limit = self.max_size()
        if max(w, h) > limit:
            raise ValueError(f"render size {w}x{h} (after supersample={supersample}) exceeds the GL limit {limit}")
        self._activate()
        fbo = self._target(w, h)
        self._draw(fbo, preset, t, camera)
        pixels = np.frombuffer(fbo.read(components=3, alignment=1), np.uint8).reshape(h, w, 3)[::-1]
        if supersample > 1:
            pixels = _box_downsample(pixels, supersample)
        return np.ascontiguousarray(pixels)

    def render_into(self, fbo: moderngl.Framebuffer, preset: str, t: float, *, camera: Camera | None = None) -> None:
        """Draw the frame into ``fbo`` (its viewport; it needs a depth buffer), e.g. ``ctx.screen`` or an offscreen
        target the demo owns. Leaves depth testing enabled and blending disabled."""
        self._activate()
        self._draw(fbo, preset, t, camera)

    def _draw(self, fbo: moderngl.Framebuffer, preset: str, t: float, camera: Camera | None) -> None:
        cam = camera if camera is not None else camera_at(preset, t)
        gpu = self._preset(preset)
        env = gpu.environment
        _, _, vw, vh = fbo.viewport
        view_proj = perspective(cam.fov_y_degrees, vw / vh, env.near, env.far) @ view_matrix(cam)
        ctx = self.ctx
        fbo.use()
        fbo.clear(0.0, 0.0, 0.0, 1.0, depth=1.0, viewport=fbo.viewport)
        ctx.disable(moderngl.BLEND)
        ctx.enable(moderngl.DEPTH_TEST)
        ctx.depth_func = "<"
        self._textures.use(0)
        gpu.shadow_map.use(1)
        lit = self._programs["lit"]
        _set(
            lit,
            u_view_proj=view_proj,
            u_light_vp=gpu.light_vp,
            u_shadow_offset=gpu.shadow_offset,
            u_eye=tuple(map(float, cam.position)),
            **self._env_uniforms(env),
        )
        for draw in gpu.draws:
            self._set_material(lit, draw.batch)
            draw.lit.render(instances=len(draw.batch.instances))
        ctx.depth_func = "<="
        _set(
            self._programs["sky"],
            u_inv_view_proj=np.linalg.inv(view_proj),
            u_eye=tuple(map(float, cam.position)),
            u_cloud_cover=env.cloud_cover,
            **self._env_uniforms(env),
        )
        self._sky.render(moderngl.TRIANGLES, vertices=3)
        ctx.depth_func = "<"

    def release(self) -> None:
        """Free every GL object (and the context, if this renderer created it); it can be used again later."""
        if self._owns_ctx and self._ctx is not None:
            if self._finalizer is not None:
                self._finalizer.detach()
                self._finalizer = None
            self._ctx.release()
            self._ctx = None
        elif self._objects:
            self._activate()
            for obj in reversed(self._objects):
                obj.release()
        self._reset()

    @property
    def anisotropy(self) -> float:
        """The anisotropic filtering level in use (1 = off); resolves "auto" against the context."""
        ctx = self._activate()
        limit = float(getattr(ctx, "max_anisotropy", 1.0) or 1.0)
        renderer = ctx.info["GL_RENDERER"].lower()
        if self._anisotropy is not None:
            return min(self._anisotropy, limit)
        return 1.0 if any(name in renderer for name in _SOFTWARE_RENDERERS) else limit

    def _track(self, obj: _T) -> _T:
        self._objects.append(obj)
        return obj

    def _env_uniforms(self, env: Environment) -> dict[str, object]:
        sun = np.asarray(env.sun_direction, np.float64)
        return {
            "u_sun_dir": tuple(map(float, sun / np.linalg.norm(sun))),
            "u_sun_colour": env.sun_colour,
            "u_sky_top": env.sky_top,
            "u_sky_horizon": env.sky_horizon,
            "u_ground": env.ground,
            "u_ambient": env.ambient,
            "u_fog_density": env.fog_density,
            "u_exposure": env.exposure,
        }

    def _set_material(self, program: moderngl.Program, batch: Batch) -> None:
        m = batch.material
        _set(
            program,
            u_specular=m.specular,
            u_shininess=m.shininess,
            u_reflect=m.reflect,
            u_emissive=m.emissive,
            u_alpha_cut=m.alpha_cut,
            u_box_uv=m.box_uv,
        )
        if m.double_sided or m.alpha_cut > 0.0:
            self.ctx.disable(moderngl.CULL_FACE)
        else:
            self.ctx.enable(moderngl.CULL_FACE)

    def _target(self, width: int, height: int) -> moderngl.Framebuffer:
        """An RGBA8 + depth offscreen framebuffer per size, a few sizes kept."""
        key = (width, height)
        if key in self._targets:
            self._targets.move_to_end(key)
            return self._targets[key]
        if len(self._targets) >= _MAX_CACHED_TARGETS:
            _, old = self._targets.popitem(last=False)
            for attachment in (*old.color_attachments, old.depth_attachment):
                self._objects.remove(attachment)
                attachment.release()
            self._objects.remove(old)
            old.release()
        ctx = self.ctx
        colour = self._track(ctx.renderbuffer(key, 4))
        depth = self._track(ctx.depth_renderbuffer(key))
        fbo = self._targets[key] = self._track(ctx.framebuffer([colour], depth))
        return fbo

    def _ensure_shared(self) -> None:
        """Programs, the texture array, mesh buffers and the sky triangle: once per renderer."""
        if self._textures is not None:
            return
        ctx = self.ctx
        sources = {
            "lit": (shaders.LIT_VERTEX, shaders.LIT_FRAGMENT),
            "shadow": (shaders.SHADOW_VERTEX, shaders.SHADOW_FRAGMENT),
            "sky": (shaders.SKY_VERTEX, shaders.SKY_FRAGMENT),
        }
        for name, (vs, fs) in sources.items():
            self._programs[name] = self._track(ctx.program(vertex_shader=vs, fragment_shader=fs))
        _set(self._programs["lit"], u_textures=0, u_shadow_map=1)
        _set(self._programs["shadow"], u_textures=0)
        for name, mesh in meshes().items():
            self._mesh_buffers[name] = self._track(ctx.buffer(mesh.tobytes()))
        self._sky = self._track(ctx.vertex_array(self._programs["sky"], []))
        self._textures = self._upload_textures()

    def _upload_textures(self) -> moderngl.TextureArray:
        stack = texture_stack()
        # Image row 0 is the top; OpenGL's first row is v = 0 (the bottom), hence the flip.
        data = np.ascontiguousarray(stack[:, ::-1]).tobytes()
        textures = self._track(self.ctx.texture_array((TEXTURE_SIZE, TEXTURE_SIZE, len(stack)), 4, data))
        textures.build_mipmaps()
        textures.filter = (moderngl.LINEAR_MIPMAP_LINEAR, moderngl.LINEAR)
        # An extension before GL 4.6: max_anisotropy reads 1.0 (or is missing) where the driver lacks it.
        if self.anisotropy > 1.0:
            textures.anisotropy = self.anisotropy
        return textures

    def _preset(self, preset: str) -> _PresetGpu:
        check_preset(preset)
        if preset not in self._presets:
            self._ensure_shared()
            self._presets[preset] = self._upload_preset(preset)
        return self._presets[preset]

    def _upload_preset(self, preset: str) -> _PresetGpu:
        scene = build_scene(preset)
        ctx = self.ctx
        draws = []
        for batch in scene.batches:
            mesh_buffer = self._mesh_buffers[batch.mesh]
            instances = self._track(ctx.buffer(batch.instances.tobytes()))
            content = [(mesh_buffer, *_MESH_FORMAT), (instances, *_INSTANCE_FORMAT)]
            lit = self._track(ctx.vertex_array(self._programs["lit"], content))
            shadow = self._track(ctx.vertex_array(self._programs["shadow"], content))
            draws.append(_Draw(batch, lit, shadow))
        light_vp, offset = _light_matrix(scene.environment)
        shadow_map = self._render_shadow_map(draws, light_vp)
        return _PresetGpu(draws, scene.environment, light_vp, shadow_map, offset)

    def _render_shadow_map(self, draws: list[_Draw], light_vp: np.ndarray) -> moderngl.Texture:
        """The scene is static, so the sun's depth map is drawn once per preset and reused for every frame."""
        ctx = self.ctx
        depth = self._track(ctx.depth_texture((SHADOW_MAP_SIZE, SHADOW_MAP_SIZE)))
        depth.compare_func = "<="
        depth.filter = (moderngl.LINEAR, moderngl.LINEAR)
        depth.repeat_x = depth.repeat_y = False
        fbo = ctx.framebuffer(depth_attachment=depth)
        fbo.use()
        fbo.clear(depth=1.0)
        ctx.enable(moderngl.DEPTH_TEST)
        ctx.disable(moderngl.CULL_FACE)
        ctx.depth_func = "<"
        ctx.polygon_offset = (2.0, 4.0)
        self._textures.use(0)
        program = self._programs["shadow"]
        _set(program, u_light_vp=light_vp)
        for draw in draws:
            if draw.batch.material.casts_shadow:
                _set(program, u_alpha_cut=draw.batch.material.alpha_cut, u_box_uv=draw.batch.material.box_uv)
                draw.shadow.render(instances=len(draw.batch.instances))
        ctx.polygon_offset = (0.0, 0.0)
        fbo.release()
        return depth
