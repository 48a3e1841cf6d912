"""Network architectures of the TAKDSR upscaler: RLFN, RFDN and PAN decoders, the teacher's
compact-feature encoder, a registry and self-describing safetensors checkpoints.

This package knows nothing of training or serving. Values are float RGB in [0, 1], NCHW.
"""

from .base import SRDecoder
from .checkpoint import (
    WEIGHTS_DIR,
    Checkpoint,
    CheckpointError,
    bundled_names,
    describe,
    describe_shape_mismatch,
    load_checkpoint,
    load_model,
    read_metadata,
    resolve_checkpoint,
    save_checkpoint,
    size_problem,
    unwrap,
    weights_sha256,
)
from .encoder import CompactEncoder, EncoderConfig, quantize_8bit
from .flops import count_flops, count_macs, count_parameters
from .pan import PAN, PANConfig
from .registry import arch_name, build_model, list_models, register_family
from .rfdn import RFDN, RFDNConfig
from .rlfn import RLFN, RLFNConfig
from .teacher import Teacher, TeacherOutput, init_from_teacher, min_lr_size

# The student the daemon runs by default (trained by the TAKDSR pipeline on bicubic LR, x2).
DEFAULT_STUDENT_PATH = WEIGHTS_DIR / "rlfn_s_takdsr_x2.safetensors"
# A student trained on LR frames rendered natively at low resolution (aliased, no antialiasing), as the
# demo renders them: the demo's daemon runs it by default (docs/ablations.md, engine-native LR).
NATIVE_STUDENT_PATH = WEIGHTS_DIR / "rlfn_s_native_x2.safetensors"

__all__ = [
    "DEFAULT_STUDENT_PATH",
    "NATIVE_STUDENT_PATH",
    "PAN",
    "RFDN",
    "RLFN",
    "WEIGHTS_DIR",
    "Checkpoint",
    "CheckpointError",
    "CompactEncoder",
    "EncoderConfig",
    "PANConfig",
    "RFDNConfig",
    "RLFNConfig",
    "SRDecoder",
    "Teacher",
    "TeacherOutput",
    "arch_name",
    "build_model",
    "bundled_names",
    "count_flops",
    "count_macs",
    "count_parameters",
    "describe",
    "describe_shape_mismatch",
    "init_from_teacher",
    "list_models",
    "load_checkpoint",
    "load_model",
    "min_lr_size",
    "quantize_8bit",
    "read_metadata",
    "register_family",
    "resolve_checkpoint",
    "save_checkpoint",
    "size_problem",
    "unwrap",
    "weights_sha256",
]
