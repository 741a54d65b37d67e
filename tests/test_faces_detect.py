"""Face detection on small images: MTCNN with memwatch's pad-and-upsample canvas.

Real faces only: scikit-image's public-domain `astronaut` photo (Eileen Collins) and its `lfw_subset`
(25 x 25 grey faces from Labeled Faces in the Wild, and 25 x 25 non-face patches). MTCNN's own
weights ship inside facenet-pytorch, so nothing is downloaded.
"""

from __future__ import annotations

import pytest
import torch
from skimage import data
from support.faces import resize_square, rgb_tensor

from memwatch.faces import FaceDetector, IdentityConfig

pytest.importorskip("facenet_pytorch", reason="the identity probe needs facenet-pytorch (memwatch[faces])")


def _iou(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    area = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / area


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def detector() -> FaceDetector:
    return FaceDetector(IdentityConfig(matcher="vggface2"))


@pytest.fixture(scope="module")
def portrait(detector: FaceDetector) -> tuple[torch.Tensor, tuple[float, float, float, float]]:
    """A square portrait crop of `astronaut` and the face box found at full resolution, in the crop's
    pixel coordinates. The face's longer side is 2/3 of the frame, as in aligned face data sets
    (CelebA, FFHQ) and the samples of models trained on them."""
    photo = resize_square(rgb_tensor(data.astronaut()), 256)  # half size: a cheaper reference detection
    (det,), _ = detector.detect(photo[None])
    assert det is not None, "MTCNN must find the astronaut's face in the full 512 px photo"
    x1, y1, x2, y2 = det.box
    side = 1.5 * max(x2 - x1, y2 - y1)
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    left, top = int(max(0, cx - side / 2)), int(max(0, cy - side / 2))
    side_px = int(min(side, photo.shape[-1] - left, photo.shape[-2] - top))
    crop = photo[:, top : top + side_px, left : left + side_px]
    return crop, (x1 - left, y1 - top, x2 - left, y2 - top)


@pytest.mark.parametrize("size", [160, 64, 32, 16])
def test_finds_astronaut_face_at_small_sizes(detector: FaceDetector, portrait, size: int) -> None:
    crop, ref_box = portrait
    image = resize_square(crop, size)
    out = detector.detect_and_crop(image[None])
    assert out.found == [True], f"no face found at {size} px"
    assert out.errors == 0
    assert out.crops.shape == (1, 3, 160, 160)
    assert 0.0 <= float(out.crops.min()) and float(out.crops.max()) <= 1.0
    # The box found at this size is the same face as at full resolution.
    scale = size / crop.shape[-1]
    found_box = tuple(v / scale for v in out.detections[0].box)
    assert _iou(found_box, ref_box) > 0.5, (size, found_box, ref_box)


def test_small_faces_without_the_canvas_are_missed_or_raise(portrait) -> None:
    """Why the canvas exists: plain MTCNN raises on a 16 px image and misses the face."""
    from facenet_pytorch import MTCNN

    crop, _ = portrait
    raw = (resize_square(crop, 16) * 255).round().byte().permute(1, 2, 0)
    with pytest.raises(Exception):  # noqa: B017 - facenet-pytorch raises a bare RuntimeError here
        MTCNN().detect(raw)


def test_no_face_images_return_none_without_error(detector: FaceDetector) -> None:
    coffee = rgb_tensor(data.coffee())
    images = [
        coffee,  # 400 x 600 photo of a coffee cup
        resize_square(coffee, 64),
        torch.full((3, 1, 1), 0.5),  # smaller than any face MTCNN can search for
        torch.zeros(3, 8, 8),
        torch.rand(3, 16, 16, generator=torch.Generator().manual_seed(0)),
        torch.full((3, 32, 32), float("nan")),  # a diverged model's output
    ]
    dets, errors = detector.detect(images)
    assert dets == [None] * len(images)
    assert errors == 0
    out = detector.detect_and_crop(torch.stack([resize_square(coffee, 64), resize_square(coffee.flip(-1), 64)]))
    assert out.found == [False, False] and out.crops.shape == (0, 3, 160, 160)


def test_batch_keeps_order_and_matches_single_images(detector: FaceDetector, portrait) -> None:
    crop, _ = portrait
    face, other = resize_square(crop, 64), resize_square(rgb_tensor(data.coffee()), 64)
    batch = torch.stack([other, face, face.flip(-1), other])
    out = detector.detect_and_crop(batch)
    assert out.found == [False, True, True, False]
    assert out.crops.shape[0] == 2
    single = detector.detect_and_crop(face[None])
    assert single.detections[0].box == pytest.approx(out.detections[1].box, abs=0.5)


def test_lfw_faces_found_and_non_faces_rejected(detector: FaceDetector) -> None:
    """25 x 25 grey LFW faces are found; the subset's 25 x 25 non-face patches are not."""
    lfw = data.lfw_subset()  # 100 faces, then 100 non-faces
    faces = torch.stack([rgb_tensor(lfw[i]) for i in range(0, 100, 5)])
    non_faces = torch.stack([rgb_tensor(lfw[i]) for i in range(100, 200, 5)])
    assert sum(detector.detect_and_crop(faces).found) >= 18
    assert sum(detector.detect_and_crop(non_faces).found) <= 2
