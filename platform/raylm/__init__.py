"""raylm: from a text corpus to a served language model on Ray.

Importing the package has one side effect, on purpose: it sets the process environment raylm runs with
(`cluster.prepare_environment`: token auth on, Ray Data's and Serve's settings, quiet progress bars). Ray reads
`RAY_AUTH_MODE` once, when it is first imported, and several modules import Ray at module level, so this must happen
before any of them; every `raylm.*` import goes through here first.
"""

import logging

from raylm.cluster import prepare_environment

prepare_environment()

# With torchao installed (serve.quantize), transformers imports it for every model it builds; torchao then logs that
# its CUDA kernels cannot load on a CPU machine, and torch warns about its enums. Expected, and not worth a page of
# warnings in every worker's log.
for _name in ("torchao", "torch.utils._pytree"):
    logging.getLogger(_name).setLevel(logging.ERROR)

__version__ = "0.1.0"
