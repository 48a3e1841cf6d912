"""GPU side of the demo, shared by the window and the headless run: render the scene at LR into per-slot offscreen
targets, read them back through a pixel-buffer object into the upscaler's shared-memory slots, upload upscaled
frames, render the native HR reference, and compose a view (SR, GPU bilinear, native, or a split of two).

Orientation: OpenGL framebuffers and render targets hold row 0 at the bottom; the upscaler's slots and every numpy
frame here hold row 0 at the top. Read-backs are flipped on the CPU; upscaled frames are uploaded as they are and
flipped in the composing shader (free there).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, TypeVar

import moderngl
import numpy as np

import scenes

__all__ = ["SOURCES", "FrameSizeError", "GpuFrames", "letterbox", "read_rgb"]

SOURCES = ("sr", "bilinear", "native")  # what a half of the composed view can show

_VERTEX = """
#version 330
out vec2 v_uv;
void main() {
    // One triangle that covers the viewport; no vertex buffer needed.
    vec2 p = vec2(float((gl_VertexID << 1) & 2), float(gl_VertexID & 2));
    v_uv = p;
    gl_Position = vec4(p * 2.0 - 1.0, 0.0, 1.0);
}
"""

_FRAGMENT = """
#version 330
uniform sampler2D u_left;
uniform sampler2D u_right;
uniform bool u_left_flip;   // true for textures uploaded top row first (the upscaled frames)
uniform bool u_right_flip;
uniform float u_split;      // divider position in [0, 1]; left of it shows u_left
uniform float u_line;       // half width of the divider line, in uv units (0: none)
in vec2 v_uv;
out vec4 f_colour;

vec3 fetch(sampler2D tex, bool flip) {
    return texture(tex, flip ? vec2(v_uv.x, 1.0 - v_uv.y) : v_uv).rgb;
}

void main() {
    if (abs(v_uv.x - u_split) < u_line) {
        f_colour = vec4(1.0);
        return;
    }
    f_colour = vec4(v_uv.x < u_split ? fetch(u_left, u_left_flip) : fetch(u_right, u_right_flip), 1.0);
}
"""


class _GLObject(Protocol):
    def release(self) -> None: ...


_G = TypeVar("_G", bound=_GLObject)


@dataclass
class _Target:
    texture: moderngl.Texture
    fbo: moderngl.Framebuffer


def letterbox(fb_w: int, fb_h: int, w: int, h: int) -> tuple[int, int, int, int]:
    """The largest viewport (x, y, width, height) of aspect w:h centred in a fb_w x fb_h framebuffer."""
    scale = min(fb_w / w, fb_h / h)
    vw, vh = max(1, round(w * scale)), max(1, round(h * scale))
    return (fb_w - vw) // 2, (fb_h - vh) // 2, vw, vh


def read_rgb(fbo: moderngl.Framebuffer) -> np.ndarray:
    """(height, width, 3) uint8 RGB of ``fbo``'s viewport, row 0 at the top."""
    x, y, w, h = fbo.viewport
    data = fbo.read(viewport=(x, y, w, h), components=3, alignment=1)
    return np.ascontiguousarray(np.frombuffer(data, np.uint8).reshape(h, w, 3)[::-1])


REFERENCE_SUPERSAMPLE = 2  # reference_pixels: each HR pixel the mean of 2x2 rendered ones


class FrameSizeError(ValueError):
    """The frames are larger than this OpenGL can draw (an invalid --lr for this machine)."""


class GpuFrames:
    """Offscreen targets and the composing pass on one moderngl context (a window's or a headless one).

    ``lr_targets`` LR render targets are indexed by the caller (upscaler slots plus any spares it needs); with
    ``reference``, frames also have a supersampled reference (reference_pixels), drawn at twice the HR size."""

    def __init__(self, renderer: scenes.SceneRenderer, lr_size: tuple[int, int], scale: int, lr_targets: int,
                 reference: bool = False) -> None:
        self.renderer = renderer
        self.ctx = ctx = renderer.ctx
        self.lr_size = lr_size
        self.hr_size = (lr_size[0] * scale, lr_size[1] * scale)
        # the reference is checked here too: its first frame failed with a traceback, after the earlier outputs went
        rendered = renderer.max_size() // (REFERENCE_SUPERSAMPLE if reference else 1)
        limit = min(rendered, ctx.info["GL_MAX_TEXTURE_SIZE"])
        if max(self.hr_size) > limit:  # the targets could not be made: refuse in words, not with a GL error
            drawn = f"; this OpenGL draws at most {limit} px a side"
            if reference:
                drawn += f" with their {REFERENCE_SUPERSAMPLE}x{REFERENCE_SUPERSAMPLE}-supersampled reference"
            raise FrameSizeError(f"--lr {lr_size[0]}x{lr_size[1]} at x{scale} makes {self.hr_size[0]}x"
                                 f"{self.hr_size[1]} frames{drawn}")
        self._objects: list[_GLObject] = []
        self._lr = [self._target(lr_size) for _ in range(lr_targets)]
        self._native = self._target(self.hr_size)
        self._composed = self._target(self.hr_size, depth=False)
        self._sr = self._track(ctx.texture(self.hr_size, 3))
        self._sr.filter = (moderngl.LINEAR, moderngl.LINEAR)
        self._sr.repeat_x = self._sr.repeat_y = False
        w, h = lr_size
        self._pbo = self._track(ctx.buffer(reserve=w * h * 3))
        self._staging = np.empty((h, w, 3), np.uint8)
        self._program = self._track(ctx.program(vertex_shader=_VERTEX, fragment_shader=_FRAGMENT))
        self._program["u_left"] = 0
        self._program["u_right"] = 1
        self._quad = self._track(ctx.vertex_array(self._program, []))

    def _track(self, obj: _G) -> _G:
        self._objects.append(obj)
        return obj

    def _target(self, size: tuple[int, int], depth: bool = True) -> _Target:
        # Bilinear filtering with clamped edges: sampling an LR target over an HR viewport is the GPU bilinear view.
        texture = self._track(self.ctx.texture(size, 4))
        texture.filter = (moderngl.LINEAR, moderngl.LINEAR)
        texture.repeat_x = texture.repeat_y = False
        depth_buffer = self._track(self.ctx.depth_renderbuffer(size)) if depth else None
        return _Target(texture, self._track(self.ctx.framebuffer([texture], depth_buffer)))

    # --- scene rendering and transfers ---------------------------------------------------------------------------

    def render_lr(self, index: int, preset: str, t: float, camera: scenes.Camera | None = None) -> None:
        """Render the scene at LR into target ``index`` (``camera`` None: the preset's path at ``t``)."""
        self.renderer.render_into(self._lr[index].fbo, preset, t, camera=camera)

    def read_lr(self, index: int, out: np.ndarray) -> None:
        """Copy LR target ``index`` into ``out`` ((h, w, 3) uint8, e.g. a shared-memory slot), top row first.

        The read goes through a pixel-buffer object: the driver copies asynchronously until the buffer is read."""
        self._lr[index].fbo.read_into(self._pbo, components=3, alignment=1)
        self._pbo.read_into(self._staging)
        np.copyto(out, self._staging[::-1])

    def copy_lr(self, src: int, dst: int) -> None:
        """Copy LR target ``src`` into ``dst`` on the GPU (keeps the LR of the frame on screen while ``src`` is
        reused)."""
        self.ctx.copy_framebuffer(self._lr[dst].fbo, self._lr[src].fbo)

    def upload_sr(self, frame: np.ndarray) -> None:
        """Upload an upscaled (H, W, 3) frame, top row first, e.g. straight from a shared-memory output slot."""
        self._sr.write(frame)

    def render_native(self, preset: str, t: float, camera: scenes.Camera | None = None) -> None:
        """Render the scene at HR (the native reference)."""
        self.renderer.render_into(self._native.fbo, preset, t, camera=camera)

    # --- composing ----------------------------------------------------------------------------------------------

    def draw(self, fbo: moderngl.Framebuffer, viewport: tuple[int, int, int, int], left: str,
             right: str | None = None, split: float = 0.5, lr: int = 0) -> None:
        """Draw ``left`` (one of SOURCES) into ``viewport`` of ``fbo``; with ``right``, a split view whose divider
        is at ``split`` (0..1 of the width). "bilinear" samples LR target ``lr``."""
        ctx = self.ctx
        fbo.use()
        fbo.viewport = viewport
        ctx.disable(moderngl.DEPTH_TEST | moderngl.CULL_FACE | moderngl.BLEND)
        for unit, source in enumerate((left, right or left)):
            self._texture(source, lr).use(unit)
        self._program["u_left_flip"] = left == "sr"
        self._program["u_right_flip"] = (right or left) == "sr"
        self._program["u_split"] = split if right else 2.0
        self._program["u_line"] = 1.0 / viewport[2] if right else 0.0
        self._quad.render(moderngl.TRIANGLES, vertices=3)

    def _texture(self, source: str, lr: int) -> moderngl.Texture:
        if source == "sr":
            return self._sr
        if source == "bilinear":
            return self._lr[lr].texture
        if source == "native":
            return self._native.texture
        raise ValueError(f"unknown view source {source!r}; choose one of {', '.join(SOURCES)}")

    def compose(self, left: str, right: str | None = None, split: float = 0.5, lr: int = 0) -> np.ndarray:
        """Draw a view at HR offscreen and return it as (H, W, 3) uint8, top row first."""
        fbo = self._composed.fbo
        self.draw(fbo, (0, 0, *self.hr_size), left, right, split, lr)
        return read_rgb(fbo)

    def reference_pixels(self, preset: str, t: float, camera: scenes.Camera | None = None) -> np.ndarray:
        """The supersampled (2x2) HR render as (H, W, 3) uint8: the aliasing-free ground truth the student was
        trained to approach, unlike the aliased native render (needs ``reference`` at construction)."""
        width, height = self.hr_size
        return self.renderer.render(preset, t, width, height, supersample=REFERENCE_SUPERSAMPLE, camera=camera)

    def native_pixels(self) -> np.ndarray:
        """The last native render as (H, W, 3) uint8, top row first."""
        return read_rgb(self._native.fbo)

    def release(self) -> None:
        for obj in reversed(self._objects):
            obj.release()
        self._objects.clear()
