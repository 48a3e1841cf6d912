"""Live demo of the TAKDSR upscaler: a scenes preset rendered at low resolution, upscaled by the daemon, shown beside
GPU bilinear scaling and a native high-resolution render, in a window (Dear ImGui HUD) or headless (PNGs, MP4,
stats.json).

Imports only ``upscaler_server.client`` (with its torch-free transport, client_session, protocol, shm and errors
modules), ``scenes``, numpy, moderngl and OpenCV, plus glfw and imgui-bundle in window mode: never torch. Run
``python -m client_demo --help``; docs/demo.md has the details.

Modules: ``cli`` (arguments, spawned daemon, exit statuses), ``config``, ``link`` (the daemon connection, on a worker
thread), ``frames`` (GPU rendering, read-back, composing; shared by both modes), ``metrics``, ``headless``,
``window`` and ``hud`` (window mode only), ``controls`` (camera rig and view state), ``spawn`` (--spawn-server).
"""

__all__: list[str] = []
