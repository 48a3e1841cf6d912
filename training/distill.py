"""The TAKDSR losses as one module: given the trained model and whichever frozen higher models
exist, it returns a dict of named L1 terms (and their sum under "total").

- Trained teacher (no guides):       pixel = |Y - Y_T|,  imitation = lambda_T |X - CF'|
- Trained TA / student with guides:  pixel = |Y - Y_M|, and per guide g:
                                     out_g = |Y_g - Y_M|,  feat_g = lambda_F |f_g - f_M|
- A TA reads the mixed input lambda1 CF' + lambda2 X, with CF' from the (first) teacher guide;
  a student reads X. Guides that are TAs read their own mixed input the same way.

The training loop does not know the stage: teacher -> TA, {teacher, TA} -> student, teacher ->
student (PISR') and the student alone (X_s) are the same code with different guides.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from models import Teacher, unwrap

__all__ = ["Distillation", "Guide", "ModelOutputs", "TrainedModel"]


@dataclass
class ModelOutputs:
    image: torch.Tensor  # (B, 3, H, W)
    features: torch.Tensor  # (B, C, h, w), the decoder's feature before the upsampler
    cf_prime: torch.Tensor | None = None  # teachers only: (B, 3, h, w)


@dataclass
class Guide:
    """A frozen higher model. `mix` is set for a TA (it reads mix[0] * CF' + mix[1] * X)."""

    name: str
    model: nn.Module
    mix: tuple[float, float] | None = None


class TrainedModel(nn.Module):
    """Wraps the trained network so that `forward` (what DDP and torch.compile see) returns
    (image, features) for decoders and (image, features, cf_prime) for teachers."""

    def __init__(self, network: nn.Module) -> None:
        super().__init__()
        self.network = network
        self.is_teacher = isinstance(network, Teacher)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if self.is_teacher:
            out = self.network(x)
            return out.image, out.features, out.cf_prime
        return self.network.forward_with_features(x)


def mixed_input(cf_prime: torch.Tensor, lr: torch.Tensor, mix: tuple[float, float]) -> torch.Tensor:
    """The TA's input (paper Eq. 4): lambda1 * CF' + lambda2 * X, both (B, 3, h, w)."""
    return mix[0] * cf_prime + mix[1] * lr


class Distillation(nn.Module):
    def __init__(
        self,
        model: nn.Module,
        guides: list[Guide],
        *,
        mix: tuple[float, float] | None = None,
        imitation_weight: float = 1e-2,
        feature_weight: float = 1e-4,
        output_weight: float = 1.0,
    ) -> None:
        """`model` is the TrainedModel (possibly DDP- or compile-wrapped); `mix` is set when it is a TA."""
        super().__init__()
        self.model = model
        self.guides = guides
        self.mix = mix
        self.imitation_weight, self.feature_weight, self.output_weight = imitation_weight, feature_weight, output_weight
        self.reads_hr = unwrap(model).is_teacher
        self.teacher_guide = next((g for g in guides if isinstance(g.model, Teacher)), None)
        needs_cf = mix is not None or any(g.mix is not None for g in guides)
        if needs_cf and self.teacher_guide is None:
            raise ValueError("a mixed input (TA) needs a teacher among the guides for CF'")
        for guide in guides:
            guide.model.eval().requires_grad_(False)

    def forward(self, lr: torch.Tensor, hr: torch.Tensor) -> dict[str, torch.Tensor]:
        guide_outputs = self._run_guides(lr, hr)
        model_input = self._model_input(lr, hr, guide_outputs)
        image, features, *cf_prime = self.model(model_input)
        terms = {"pixel": F.l1_loss(image, hr)}
        if cf_prime:
            terms["imitation"] = self.imitation_weight * F.l1_loss(cf_prime[0], lr)
        for guide in self.guides:
            target = guide_outputs[guide.name]
            terms[f"out_{guide.name}"] = self.output_weight * F.l1_loss(image, target.image)
            terms[f"feat_{guide.name}"] = self.feature_weight * F.l1_loss(features, target.features)
        terms["total"] = torch.stack(list(terms.values())).sum()
        return terms

    @torch.no_grad()
    def _run_guides(self, lr: torch.Tensor, hr: torch.Tensor) -> dict[str, ModelOutputs]:
        outputs: dict[str, ModelOutputs] = {}
        cf_prime = None
        for guide in self.guides:  # the teacher comes first, so CF' exists before any TA needs it
            if isinstance(guide.model, Teacher):
                out = guide.model(hr)
                cf_prime = out.cf_prime
                outputs[guide.name] = ModelOutputs(out.image, out.features, out.cf_prime)
            else:
                x = lr if guide.mix is None else mixed_input(cf_prime, lr, guide.mix)
                image, features = guide.model.forward_with_features(x)
                outputs[guide.name] = ModelOutputs(image, features)
        return outputs

    def _model_input(self, lr: torch.Tensor, hr: torch.Tensor, guide_outputs: dict[str, ModelOutputs]) -> torch.Tensor:
        if self.reads_hr:
            return hr
        if self.mix is None:
            return lr
        return mixed_input(guide_outputs[self.teacher_guide.name].cf_prime, lr, self.mix)
