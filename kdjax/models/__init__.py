"""The networks: torchvision architectures in flax.linen, their registry, the CPU kernels, the
torchvision name mapping and a torch-free reader of ``.pth`` files.

    registry    name -> ModelSpec (constructor, head, input spec, feature taps)
    resnet      torchvision's ResNets (18-152, ResNeXt, Wide), NHWC, names mirroring the state_dict
    kernels     train-mode BatchNorm and max-pool formulated for XLA:CPU
    torchvision state_dict <-> flax variables, torchvision's ImageNet files
    torchfile   a safe reader of torch.save files (no torch, no pickled code run)
"""

from kdjax.models.registry import (  # noqa: F401
    ARCHS,
    InputSpec,
    ModelSpec,
    create_model,
    get,
    head_params,
    num_outputs,
    replace_head,
    without_head,
)
from kdjax.models.resnet import (  # noqa: F401
    abstract_variables,
    count_params,
    init_variables,
)
