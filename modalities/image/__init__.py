"""Image models and image data sets (``mmkd.modalities.image``).

``resnet`` (torchvision's ResNet-18, with a small-input stem, ``resnet18``), ``cifar`` (the CIFAR
ResNets and wide ResNets of the distillation literature), ``mobile`` (CIFAR MobileNetV2 and
ShuffleNetV2 students), ``folders`` (the ``image_folder`` and
``cifar10`` data sets: image trees or zips, decoded once, with augmentations), ``corrupt`` (a seeded
colour, contrast, blur and noise shift of uint8 images: the shifted pool of KD^3), ``mnist`` (the MNIST
test set as three splits, optionally a shifted test split).
"""
from mmkd.modalities.image import cifar, folders, mnist, mobile, resnet  # noqa: F401  (registration)
from mmkd.modalities.image import vit  # noqa: F401  (registration: vit_tiny, the ViT student of OFA-KD)
from mmkd.modalities.image.resnet import ResNet18, load_resnet_weights

__all__ = ["ResNet18", "load_resnet_weights"]
