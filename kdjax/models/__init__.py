"""The networks: torchvision architectures in flax.linen, their registry, the CPU kernels, the
torchvision name mapping and a torch-free reader of ``.pth`` files.

    registry    name -> ModelSpec (constructor, head, input spec, feature taps)
    spec        ModelSpec and InputSpec: what kdjax may know of an architecture
    layers      the shared blocks: torch's BatchNorm, Conv2dNormActivation, SqueezeExcitation, ...
    resnet      torchvision's ResNets (18-152, ResNeXt, Wide), NHWC, names mirroring the state_dict
    mobilenet   MobileNetV2, MobileNetV3 small and large
    efficientnet  EfficientNet-B0
    convnext    ConvNeXt-T
    vit         ViT-B/16 (224 px)
    cifar       the CIFAR networks of the KD tables (mdistiller's): cifar_resnet (ResNets, WRNs),
                cifar_vgg, cifar_mobile (MobileNetV2, ShuffleNet V1/V2), cifar_layers
    imagenet    torchvision's ImageNet weight files: URL, hash, eval transform, accuracy
    kernels     train-mode BatchNorm and max-pool formulated for XLA:CPU
    torchvision state_dict <-> flax variables, torchvision's ImageNet files
    timm        timm's parameter names onto the same networks, and its pretrained tags (timm_cfgs)
    torchfile   a safe reader of torch.save files (no torch, no pickled code run)
    user        users' own networks (Linen, or NNX through flax's bridge): UserSpec, register
"""

from kdjax.models.layers import (  # noqa: F401
    abstract_variables,
    count_params,
    init_variables,
)
from kdjax.models.registry import (  # noqa: F401
    ARCHS,
    BUILTIN,
    InputSpec,
    ModelSpec,
    create_model,
    from_module,
    get,
    head_params,
    num_outputs,
    register,
    replace_head,
    without_head,
)
from kdjax.models.user import UserSpec, nnx_module  # noqa: F401
