"""raylm: from a text corpus to a served language model on Ray."""

import logging

from raylm.cluster import prepare_environment

# Ray reads RAY_AUTH_MODE once, when it is first imported: set raylm's defaults before any module imports ray.
prepare_environment()

# With torchao installed (serve.quantize), transformers imports it for every model it builds; torchao then logs that
# its CUDA kernels cannot load on a CPU machine, and torch warns about its enums. Expected, and not worth a page of
# warnings in every worker's log.
for _name in ("torchao", "torch.utils._pytree"):
    logging.getLogger(_name).setLevel(logging.ERROR)

__version__ = "0.1.0"
