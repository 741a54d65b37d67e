"""Face-model fixtures shared by the face tests: real images and InceptionResnetV1 weights written here."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from skimage import data


def rgb_tensor(arr: np.ndarray) -> torch.Tensor:
    x = torch.from_numpy(np.asarray(arr)).float()
    x = x / 255.0 if x.max() > 1.0 else x
    x = x.unsqueeze(-1).repeat(1, 1, 3) if x.ndim == 2 else x[..., :3]
    return x.permute(2, 0, 1).contiguous()


def resize_square(x: torch.Tensor, size: int) -> torch.Tensor:
    return F.interpolate(x[None], size=(size, size), mode="bicubic", antialias=True).clamp(0, 1)[0]


def face_state_dict() -> dict[str, torch.Tensor]:
    """InceptionResnetV1 at a fixed random init, last batch-norm re-centred on LFW crops (see the face tests)."""
    from facenet_pytorch import InceptionResnetV1

    torch.manual_seed(0)
    model = InceptionResnetV1().eval()
    lfw = data.lfw_subset()
    crops = F.interpolate(torch.stack([rgb_tensor(lfw[i]) for i in range(0, 80, 5)]), size=(160, 160), mode="bilinear")
    feats: list[torch.Tensor] = []
    hook = model.last_linear.register_forward_hook(lambda mod, inp, out: feats.append(out))
    with torch.no_grad():
        model((crops * 255 - 127.5) / 128)
    hook.remove()
    model.last_bn.running_mean.copy_(feats[0].mean(0))
    model.last_bn.running_var.copy_(feats[0].var(0))
    return {k: v.contiguous() for k, v in model.state_dict().items()}
